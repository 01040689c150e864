"""`write_tiny` (tests/conftest.py): the torch-free tiny checkpoints the lossless tests run on.

They must be the models transformers would run from the same folder (HF tensor names, [out, in]
Linear layout, config fields), or the torch-free tests would test a different model than the oracle
ones: the first test loads each folder with transformers' torch model and compares logits (needs
torch). The others run without torch.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import causal_mask
from specdec.loading import load_hf_folder
from specdec.models import forward, to_device
from specdec.sampling import SamplingConfig, probabilities
from tests.conftest import ARCHS, write_tiny

TOKENS = np.array([[5, 9, 3, 44, 7, 1, 2, 3, 60, 61]])


def _ours(path):
    """(LoadedModel, specdec's logits [T, V] for TOKENS, taken modulo the vocabulary)."""
    loaded = load_hf_folder(path)
    tokens, t = TOKENS % loaded.cfg.vocab_size, TOKENS.shape[1]
    logits, _, _ = forward(to_device(loaded.params, loaded.cfg), loaded.cfg, jnp.asarray(tokens),
                           jnp.arange(t)[None], None, causal_mask(1, t))  # fmt: skip
    return loaded, np.asarray(logits[0])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_written_checkpoint_is_the_model_transformers_runs(arch, tmp_path):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    write_tiny(arch, tmp_path, std=0.2, head_std=0.6)  # large weights: every tensor matters
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    _, ours = _ours(tmp_path)
    with torch.no_grad():
        ref = hf(torch.tensor(TOKENS)).logits.numpy()[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4)  # measured: <= 1.6e-5
    assert ours.std() > 1.0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_written_checkpoint_loads_with_its_config_and_tokenizer(arch, tmp_path):
    write_tiny(arch, tmp_path, layers=3, vocab=11)
    loaded = load_hf_folder(tmp_path)
    cfg = loaded.cfg
    assert (cfg.arch, cfg.num_layers, cfg.vocab_size, cfg.eos_token_ids) == (arch.split("_")[0], 3, 11, (1,))
    assert cfg.tie_word_embeddings == (arch == "llama_tied")
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.sliding_window == (5 if arch == "mistral" else None)
    assert (cfg.rope_scaling is not None) == (arch == "llama")
    # (transformers maps model_type qwen2 to its own tokenizer class, and matches the special tokens
    # "t0".."t2" inside longer words: both as with build_tiny's tokenizer)
    if arch != "qwen2":
        assert loaded.tokenizer.encode("t5 t9 t7") == [5, 9, 7] and loaded.tokenizer.eos_token_id == 1


def test_head_std_makes_next_token_distributions_peaked(tmp_path):
    """HF's init (std 0.02) gives near-uniform next-token distributions; head_std = 0.6 (what
    test_spec_stats.py uses) peaked ones, and the seed changes the model."""
    write_tiny("llama", tmp_path / "flat", vocab=8)
    write_tiny("llama", tmp_path / "peaked", vocab=8, std=0.3, head_std=0.6)
    write_tiny("llama", tmp_path / "other", vocab=8, std=0.3, head_std=0.6, seed=1)
    top = {}
    for name in ("flat", "peaked", "other"):
        _, logits = _ours(tmp_path / name)
        top[name] = np.asarray(probabilities(jnp.asarray(logits), SamplingConfig(1.0))).max(-1)
    assert top["flat"].max() < 0.2 < 0.5 < top["peaked"].mean()  # uniform over 8 would be 0.125
    assert not np.allclose(top["peaked"], top["other"])
