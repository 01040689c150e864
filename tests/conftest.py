"""Shared fixtures: tiny random HF models (the numerical oracle) loaded through specdec's loader."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite compiles thousands of small programs and runs each briefly, so LLVM's optimisation
# passes are most of its time: at level 0 tests/test_spec.py took 213 s instead of 309 s (one Zen 3
# core); skipping LLVM's expensive passes took ~10% off two compile-bound test pairs (two Xeon
# cores; within the noise of a whole run). Speed is measured in benchmarks/, never in tests.
# Subprocesses inherit it: add to XLA_FLAGS.
_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
# Many tests compile the same programs (the same tiny configs and shapes) in different files and
# worker processes: a compilation cache for this run, shared by the workers (they inherit the
# variable: the controller loads this file first), took ~15% off test_spec/contracts/adaptive.
# Fresh each run (removed at the end), so every run compiles what it runs once, as CI does.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="specdec-tests-jax-cache-")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

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


def write_tiny_tokenizer(path, vocab: int = VOCAB) -> None:
    """tokenizer.json + tokenizer_config.json for `_tiny_tokenizer`'s vocabulary, written with the
    `tokenizers` library alone (no torch, no transformers model class)."""
    import json
    import pathlib

    import tokenizers

    words = tokenizers.models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")
    tok = tokenizers.Tokenizer(words)
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    path = pathlib.Path(path)
    tok.save(str(path / "tokenizer.json"))
    # what transformers 5 writes for a tokenizers-backed tokenizer
    config = dict(backend="tokenizers", tokenizer_class="TokenizersBackend", unk_token="t0", eos_token="t1")
    config["bos_token"] = "t2"
    (path / "tokenizer_config.json").write_text(json.dumps(config))


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


# config.json fields per arch for `write_tiny` (what transformers' save_pretrained writes for ARCHS).
_NP_CONFIGS = {
    "llama": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False,
        rope_parameters=dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "llama_tied": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, mlp_bias=False,
        tie_word_embeddings=True,
    ),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=5),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", use_sliding_window=False),
}  # fmt: skip


def write_tiny(
    arch: str, path, *, layers: int = 2, seed: int = 0, vocab: int = VOCAB, std: float = 0.02,
    head_std: float | None = None,
) -> None:  # fmt: skip
    """Write a random tiny HF checkpoint folder of `arch` with numpy alone (no torch): config.json,
    model.safetensors (HF tensor names, [out, in] Linear layout) and the word-level tokenizer.

    The same shapes as `build_tiny` (hidden 64, 4 query / 2 KV heads, MLP 96, 128 positions); weights
    normal(0, std) like HF's init (norm weights 1; qwen2's q/k/v biases normal(0, 0.5)). `head_std`
    (default `std`) scales lm_head alone: the final RMSNorm makes the hidden state unit-scale, so a
    logit has standard deviation ~ head_std * 8, e.g. 0.16 (near-uniform) at 0.02 and ~5 (peaked
    next-token distributions) at 0.6. Tied archs have no lm_head (head_std is then ignored).
    The folder loads with `specdec.loading.load_hf_folder` and with transformers' from_pretrained.
    """
    import json
    import pathlib

    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    d, inter, heads, kv_heads, head_dim = 64, 96, 4, 2, 16
    spec = _NP_CONFIGS[arch]
    tied = spec.get("tie_word_embeddings", False)
    normal = lambda *shape, s=std: rng.normal(0.0, s, shape).astype(np.float32)
    ones = lambda n: np.ones((n,), np.float32)
    w = {"model.embed_tokens.weight": normal(vocab, d), "model.norm.weight": ones(d)}
    if not tied:
        w["lm_head.weight"] = normal(vocab, d, s=std if head_std is None else head_std)
    for i in range(layers):
        p = f"model.layers.{i}."
        w |= {
            p + "input_layernorm.weight": ones(d),
            p + "post_attention_layernorm.weight": ones(d),
            p + "self_attn.q_proj.weight": normal(heads * head_dim, d),
            p + "self_attn.k_proj.weight": normal(kv_heads * head_dim, d),
            p + "self_attn.v_proj.weight": normal(kv_heads * head_dim, d),
            p + "self_attn.o_proj.weight": normal(d, heads * head_dim),
            p + "mlp.gate_proj.weight": normal(inter, d),
            p + "mlp.up_proj.weight": normal(inter, d),
            p + "mlp.down_proj.weight": normal(d, inter),
        }
        if arch == "qwen2":  # biases that matter (HF initialises them to zero)
            for proj, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
                w[p + f"self_attn.{proj}_proj.bias"] = normal(n * head_dim, s=0.5)
    config = dict(
        vocab_size=vocab, hidden_size=d, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=128, rms_norm_eps=1e-6, hidden_act="silu", tie_word_embeddings=False,
        bos_token_id=2, eos_token_id=1, initializer_range=std, dtype="float32",
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    )  # fmt: skip
    config |= spec
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config, indent=1))
    write_tiny_tokenizer(path, vocab)


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


@pytest.fixture(scope="session")
def tiny_targets(tmp_path_factory):
    """arch -> specdec LoadedModel of a `write_tiny` checkpoint (torch-free), built once per session.

    For tests that need a random tiny model but no oracle: speculative == AR, losslessness, the
    loop's bookkeeping. Tests comparing with transformers' torch forward use `tiny_models`."""
    from specdec.loading import load_hf_folder

    out = {}
    for arch in _NP_CONFIGS:
        path = tmp_path_factory.mktemp(f"np_{arch}")
        write_tiny(arch, path)
        out[arch] = load_hf_folder(path)
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


ACCEPT_TAPS = (0, 1, 2)  # L = 2: EAGLE-3's (2, 1, 0) and the final normed state 2


@pytest.fixture(scope="session")
def accept_tiny(tmp_path_factory):
    """(target params, cfg, feature set folder, examples): a tiny random target with peaked
    next-token distributions and 24 motif sequences (answer = the second half)."""
    import numpy as np

    from specdec.loading import load_hf_folder
    from specdec.models import to_device
    from specdec.train import data, features

    path = tmp_path_factory.mktemp("acc_target")
    write_tiny("llama", path, head_std=0.6)
    loaded = load_hf_folder(path)
    cfg = loaded.cfg
    params = to_device(loaded.params, cfg)
    rng = np.random.default_rng(0)
    motifs = [rng.integers(3, cfg.vocab_size, k) for k in (3, 4, 5)]
    exs = []
    for _ in range(24):
        n = int(rng.integers(24, 40))
        motif = motifs[int(rng.integers(3))]
        toks = np.roll(np.resize(motif, n + len(motif)), -int(rng.integers(len(motif))))[:n].astype(np.int32)
        exs.append(data.Example(toks, np.arange(n) >= n // 2))
    feats = tmp_path_factory.mktemp("acc_feats")
    features.extract(params, cfg, "tiny", exs, feats, taps=ACCEPT_TAPS, shard_size=16, progress=False)
    return params, cfg, feats, exs


def pytest_sessionfinish(session, exitstatus):
    """The process that made this run's compilation cache removes it (workers inherit it)."""
    if _OWN_CACHE:
        import shutil

        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
