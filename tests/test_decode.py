"""The on-device AR loop: HF parity (needs torch), ragged batches, EOS, bucketing, debug loop, bad
input (torch-free: a `write_tiny` checkpoint)."""

from __future__ import annotations

import contextlib

import jax
import pytest

from specdec.generate import PromptTooLongError, bucket, generate
from specdec.models import to_device
from specdec.sampling import SamplingConfig
from tests.conftest import VOCAB

PROMPTS = [[5, 9, 3, 44, 7], [12, 13], list(range(20, 50))]


@pytest.fixture(scope="module")
def llama(tiny_targets):
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())  # random models: never stop early unless asked
    return to_device(loaded.params, cfg), cfg


def _hf_greedy(hf, prompt, n):
    import torch

    with torch.no_grad():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_equals_hf_generate(tiny_models):
    """The oracle: transformers' torch greedy generate on the same checkpoint (skips without torch)."""
    hf, loaded = tiny_models["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    out = generate(params, cfg, PROMPTS, max_new_tokens=24)
    for prompt, toks in zip(PROMPTS, out.tokens, strict=True):
        assert toks == _hf_greedy(hf, prompt, 24)
    assert out.steps == 23  # first token comes from prefill
    assert out.finished == [False] * 3


def test_batch_rows_equal_each_prompt_alone(llama):
    params, cfg = llama
    batched = generate(params, cfg, PROMPTS, max_new_tokens=16).tokens
    for prompt, row in zip(PROMPTS, batched, strict=True):
        assert generate(params, cfg, [prompt], max_new_tokens=16).tokens[0] == row


def test_python_debug_loop_runs_the_same_body(llama):
    params, cfg = llama
    s = SamplingConfig(temperature=0.9, top_k=20, top_p=0.95)
    dev = generate(params, cfg, PROMPTS, max_new_tokens=12, sampling=s, seed=3)
    py = generate(params, cfg, PROMPTS, max_new_tokens=12, sampling=s, seed=3, loop="python")
    assert dev.tokens == py.tokens and dev.steps == py.steps


def test_eos_stops_each_row_and_is_kept(llama):
    params, cfg = llama
    free = generate(params, cfg, PROMPTS, max_new_tokens=20).tokens
    eos = free[0][3]  # a token row 0 produces at step 3
    out = generate(params, cfg, PROMPTS, max_new_tokens=20, eos_ids=[eos])
    for row_free, row in zip(free, out.tokens, strict=True):
        stop = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row == row_free[:stop]
    assert out.finished[0] and out.tokens[0][-1] == eos


def test_max_new_tokens_and_sampling_seeds(llama):
    params, cfg = llama
    s = SamplingConfig(temperature=1.0)
    a = generate(params, cfg, PROMPTS, max_new_tokens=7, sampling=s, seed=0).tokens
    b = generate(params, cfg, PROMPTS, max_new_tokens=7, sampling=s, seed=0).tokens
    c = generate(params, cfg, PROMPTS, max_new_tokens=7, sampling=s, seed=1).tokens
    assert a == b and a != c
    assert all(len(r) == 7 and all(0 <= t < VOCAB for t in r) for r in a)


@contextlib.contextmanager
def backend_compiles():
    """Count XLA compilations inside the block (`jax.monitoring`'s compile events; public API)."""
    seen: list[str] = []

    def listener(event: str, duration: float, **kw) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            seen.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield seen
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_prompts_in_one_bucket_share_a_compilation(llama):
    """A second batch whose prompts and budget fall in the same buckets compiles nothing; one past a
    bucket's edge compiles (so the counter sees compilations at all)."""
    params, cfg = llama
    generate(params, cfg, [[1, 2, 3]], max_new_tokens=5)
    with backend_compiles() as same:
        generate(params, cfg, [[4, 5, 6, 7, 8, 9, 10]], max_new_tokens=6)  # same buckets (16, 16)
    assert same == []
    with backend_compiles() as longer:  # a budget of 33: bucket 64, which no other test here uses
        generate(params, cfg, [[4, 5, 6, 7, 8, 9, 10]], max_new_tokens=33)
    assert len(longer) >= 1
    assert bucket(1) == 16 and bucket(16) == 16 and bucket(17) == 32


def test_bad_input_errors(llama):
    params, cfg = llama
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 128 tokens"):
        generate(params, cfg, [list(range(120))], max_new_tokens=20)
    with pytest.raises(PromptTooLongError, match="cache_size=10 cannot hold"):
        generate(params, cfg, [[1, 2, 3]], max_new_tokens=20, cache_size=10)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(params, cfg, [[1], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="loop must be"):
        generate(params, cfg, [[1]], max_new_tokens=4, loop="gpu")
