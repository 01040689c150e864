"""GGUF files written the way llama.cpp writes them (tiny random models): the loader undoes the
rotary permutation for 'llama' and not for 'qwen2', handles biases and tying, reads the tokenizer,
and never imports torch. The embedded SmolLM2 GGUF against transformers: tests/test_loading.py.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import numpy as np
import pytest

from specdec.loading import load_model
from tests.test_loading import TINY, assert_params_equal_hf, save_tiny


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's Q/K permutation (what our loader must undo for arch 'llama')."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_tiny_gguf(path: pathlib.Path, arch: str, sd: dict, *, tie: bool) -> None:
    """Write a tiny F32 GGUF the way llama.cpp lays one out (Q/K permuted for 'llama' only)."""
    import gguf

    from specdec.tokenizer import _bytes_to_unicode

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(TINY["num_hidden_layers"])
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(TINY["hidden_size"])
    w.add_feed_forward_length(TINY["intermediate_size"])
    w.add_head_count(TINY["num_attention_heads"])
    w.add_head_count_kv(TINY["num_key_value_heads"])
    w.add_rope_freq_base(50000.0)
    w.add_layer_norm_rms_eps(1e-6)
    tokens = sorted(_bytes_to_unicode().values()) + [
        "Ġt",
        "he",
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 3])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(len(tokens) - 2)
    w.add_eos_token_id(len(tokens) - 1)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    heads, kv = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not tie:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {
        "attn_norm.weight": "input_layernorm.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
    }
    for n in range(TINY["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for g, h in names.items():
            w.add_tensor(f"blk.{n}.{g}", sd[p + h])
        for g, h, nh in [("attn_q", "q_proj", heads), ("attn_k", "k_proj", kv)]:
            for suffix in ["weight", "bias"] if arch == "qwen2" else ["weight"]:
                t = sd[f"{p}self_attn.{h}.{suffix}"]
                w.add_tensor(f"blk.{n}.{g}.{suffix}", _llama_cpp_permute(t, nh) if arch == "llama" else t)
        if arch == "qwen2":
            w.add_tensor(f"blk.{n}.attn_v.bias", sd[p + "self_attn.v_proj.bias"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", True)])
def test_tiny_gguf_roundtrip(tmp_path, kind, tie):
    """A llama.cpp-style GGUF of a random tiny model loads back to the HF weights exactly: the rotary
    permutation is undone for 'llama' and not applied for 'qwen2' (NeoX RoPE); biases and tying handled."""
    sd = save_tiny(kind, tmp_path / "hf", tie=tie)
    _write_tiny_gguf(tmp_path / "tiny.gguf", kind, sd, tie=tie)
    loaded = load_model(str(tmp_path / "tiny.gguf"))
    c = loaded.cfg
    assert (c.arch, c.vocab_size, c.tie_word_embeddings, c.attention_bias) == (
        kind,
        300,
        tie,
        kind == "qwen2",
    )
    assert (c.rope_theta, c.rms_norm_eps, c.eos_token_ids) == (50000.0, pytest.approx(1e-6), (260,))
    assert_params_equal_hf(loaded.params, sd, c)
    tok = loaded.tokenizer
    assert tok(" the<|im_end|>")["input_ids"] == [256, 257, 260]  # merges used, control token whole
    chat = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    assert chat == "<|im_start|>x<|im_end|>"


def test_gguf_load_does_not_import_torch(tmp_path):
    """The runtime has no torch: loading a GGUF (params + tokenizer) must not import it."""
    sd = save_tiny("llama", tmp_path / "hf")
    _write_tiny_gguf(tmp_path / "tiny.gguf", "llama", sd, tie=False)
    code = (
        "import sys; from specdec.loading import load_gguf; "
        f"m = load_gguf({str(tmp_path / 'tiny.gguf')!r}); m.tokenizer('hi 12'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
