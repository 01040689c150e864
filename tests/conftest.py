"""Shared fixtures: tiny random HF models (the numerical oracle) loaded through specdec's loader."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite compiles thousands of small programs and runs each briefly, so LLVM's optimisation
# passes are most of its time: at level 0 tests/test_spec.py took 213 s instead of 309 s (one Zen 3
# core). Speed is measured in benchmarks/, never in tests. Subprocesses inherit it: add to XLA_FLAGS.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import pytest  # noqa: E402

VOCAB = 97


def _tiny_tokenizer(vocab: int):
    """A word-level tokenizer over "t0".."t{V-1}" so tiny checkpoints are complete HF folders."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    model = tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1", bos_token="t2")


ARCHS = {
    "llama": dict(
        cls="LlamaForCausalLM",
        cfg="LlamaConfig",
        kw=dict(
            rope_parameters=dict(
                rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                high_freq_factor=4.0, original_max_position_embeddings=32,
            ),
        ),
    ),
    "llama_tied": dict(cls="LlamaForCausalLM", cfg="LlamaConfig", kw=dict(tie_word_embeddings=True)),
    "mistral": dict(cls="MistralForCausalLM", cfg="MistralConfig", kw=dict(sliding_window=5)),
    "qwen2": dict(cls="Qwen2ForCausalLM", cfg="Qwen2Config", kw=dict()),
}  # fmt: skip


def build_tiny(arch: str, path, *, layers: int = 2, seed: int = 0, vocab: int = VOCAB):
    """Save a random tiny HF model of `arch` (see ARCHS) to `path`; return the torch model (eval)."""
    torch = pytest.importorskip("torch")
    import transformers

    spec = ARCHS[arch]
    kw = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, bos_token_id=2, eos_token_id=1,
    )  # fmt: skip
    kw.update(spec["kw"])
    config = getattr(transformers, spec["cfg"])(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, spec["cls"])(config).eval()
    if arch == "qwen2":  # HF initialises biases to zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(path)
    _tiny_tokenizer(vocab).save_pretrained(path)
    return model


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Drop every compiled executable after each test module.

    XLA:CPU maps each executable's code into its own memory regions (~10 per executable). One
    process running the whole suite compiles thousands of them and hits the kernel's
    vm.max_map_count (65,530): LLVM then fails with "Cannot allocate memory" and the process
    aborts. Modules share no executables, so clearing between modules costs nothing.
    """
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (torch model, specdec LoadedModel), built once per test session."""
    from specdec.loading import load_hf_folder

    out = {}
    for arch in ARCHS:
        path = tmp_path_factory.mktemp(arch)
        out[arch] = (build_tiny(arch, path), load_hf_folder(path))
    return out


@pytest.fixture(scope="module")
def tiny_cache(tiny_models, tmp_path_factory):
    """A tiny target and a feature cache of 40 random sequences (loss on the second half):
    (params, cfg, cache folder, examples, checkpoint folder)."""
    import pathlib

    import numpy as np

    from specdec.models import to_device
    from specdec.train import data, features

    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg
    params = to_device(loaded.params, cfg)
    rng = np.random.default_rng(0)
    exs = []
    motifs = [rng.integers(3, cfg.vocab_size, k) for k in (3, 4, 5)]
    for _ in range(40):  # repeated motifs at random phases: a learnable, predictable future
        n = int(rng.integers(24, 40))
        motif = motifs[int(rng.integers(3))]
        toks = np.roll(np.resize(motif, n + len(motif)), -int(rng.integers(len(motif))))[:n].astype(np.int32)
        exs.append(data.Example(toks, np.arange(n) >= n // 3))
    path = tmp_path_factory.mktemp("feats")
    taps = (0, 1, 2)  # L = 2: EAGLE-3 taps (2, 1, 0) and the final state 2
    features.extract(params, cfg, "tiny", exs, path, taps=taps, shard_size=16, progress=False)
    src = pathlib.Path(loaded.source)
    return params, cfg, path, exs, str(src if src.is_dir() else src.parent)


@pytest.fixture(scope="session")
def embedded():
    """The embedded default target (SmolLM2-135M-Instruct GGUF), loaded once."""
    from specdec.loading import CheckpointError, load_model

    try:
        return load_model("smollm2-135m-instruct")
    except CheckpointError as e:
        if os.environ.get("SPECDEC_REQUIRE_EMBEDDED"):  # CI: a missing install step must fail
            raise
        pytest.skip(f"embedded target unavailable: {e}")


@pytest.fixture(scope="session")
def hf_embedded(embedded):
    """transformers' torch model of the same GGUF file (its own dequantization): the oracle."""
    import pathlib

    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    path = pathlib.Path(embedded.source)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()
