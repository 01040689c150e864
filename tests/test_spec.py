"""The speculative loop end to end: lossless at temperature 0 (= AR token for token) for every
builder × verifier × training-free drafter, ragged batches, and the sampled distribution at T > 0."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specdec.cache import causal_mask
from specdec.drafters import DraftModel, NGram, layer_skip
from specdec.generate import generate
from specdec.models import forward, to_device
from specdec.sampling import SamplingConfig, probabilities
from specdec.trees import parse_tree
from specdec.verifiers import get_verifier
from tests.conftest import build_tiny

pytest.importorskip("torch")
# Repetitive prompts so that n-gram lookup finds matches; a third row of different length.
PROMPTS = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13], list(range(20, 45))]
N_NEW = 20
TREES = ["chain:3", "static:[(0,),(1,),(0,0),(0,1),(1,0),(0,0,0)]", "dynamic:depth=3,topk=3,n=10",
         "dyspec:n=8", "rsd:2,2,1", "rsd-beam:depth=3,beam=2",
         "chain:3+budget:2", "dynamic:depth=3,topk=3,n=10+budget:5"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    from specdec.loading import load_hf_folder

    path = tmp_path_factory.mktemp("draft")
    build_tiny("llama", path, layers=1, seed=7)  # a different random model drafting
    dl = load_hf_folder(path)
    ar = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW).tokens
    drafters = {
        "self": (DraftModel(cfg), params),  # the target drafting for itself: everything accepted
        "other": (DraftModel(dl.cfg.replace(eos_token_ids=())), to_device(dl.params, dl.cfg)),
        "layerskip": layer_skip(params, cfg, 1),
        "ngram": (NGram(cfg.vocab_size, max_depth=3), None),
    }
    return params, cfg, ar, drafters


def _run(setup, drafter, tree, verifier=None, **kw):
    params, cfg, _, drafters = setup
    d, dp = drafters[drafter]
    builder = parse_tree(tree)
    if isinstance(d, NGram):
        d = NGram(d.vocab_size, max_depth=builder.max_depth)
    return generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, drafter=d, draft_params=dp, builder=builder,
                    verifier=verifier and get_verifier(verifier), **kw)  # fmt: skip


@pytest.mark.parametrize("drafter,tree", list(itertools.product(["self", "other", "ngram"], TREES)))
def test_greedy_speculative_equals_ar_for_every_builder(setup, drafter, tree):
    out = _run(setup, drafter, tree)
    assert out.tokens == setup[2]
    assert sum(k * c for k, c in enumerate(out.accepted_hist)) == sum(len(r) - 1 for r in out.tokens)
    if drafter == "self" and "+budget" not in tree:  # a perfect drafter: its top-1 child is always accepted
        assert out.tau > 1.8  # (the last step may be cut)
    if "+budget" in tree:  # the batch verifies at most `budget` drafts per step, however many rows
        budget = parse_tree(tree).budget
        assert sum((k - 1) * c for k, c in enumerate(out.accepted_hist) if k) <= budget * out.steps
        if drafter == "self":
            assert out.tau > 1.3


@pytest.mark.parametrize("verifier", ["greedy", "rrs", "target_only", "speculative"])
@pytest.mark.parametrize("drafter", ["other", "layerskip"])
def test_greedy_speculative_equals_ar_for_every_verifier(setup, drafter, verifier):
    out = _run(setup, drafter, "chain:3", verifier)
    assert out.tokens == setup[2]


def test_python_loop_and_batch_rows_alone(setup):
    params, cfg, ar, drafters = setup
    dev = _run(setup, "other", "dynamic:depth=3,topk=3,n=10")
    py = _run(setup, "other", "dynamic:depth=3,topk=3,n=10", loop="python")
    assert dev.tokens == py.tokens == ar and dev.accepted_hist == py.accepted_hist
    d, dp = drafters["other"]
    for prompt, row in zip(PROMPTS, dev.tokens, strict=True):
        alone = generate(params, cfg, [prompt], max_new_tokens=N_NEW, drafter=d, draft_params=dp,
                         builder=parse_tree("dynamic:depth=3,topk=3,n=10"))  # fmt: skip
        assert alone.tokens[0] == row


def test_eos_and_max_new_tokens_in_speculative_steps(setup):
    params, cfg, ar, drafters = setup
    d, dp = drafters["self"]  # accepts whole paths: EOS and the budget fall inside a step
    eos = ar[0][5]
    out = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, drafter=d, draft_params=dp,
                   builder=parse_tree("chain:4"), eos_ids=[eos])  # fmt: skip
    for ref, row in zip(ar, out.tokens, strict=True):
        stop = ref.index(eos) + 1 if eos in ref else N_NEW
        assert row == ref[:stop]
    out = generate(
        params, cfg, PROMPTS, max_new_tokens=7, drafter=d, draft_params=dp, builder=parse_tree("chain:4")
    )
    assert [len(r) for r in out.tokens] == [7, 7, 7]


# --- temperature > 0: the emitted distribution is the target's (end-to-end chi-square) -------------------


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A vocab-8 model so the joint law of two tokens has 64 cells, and a different draft model."""
    from specdec.loading import load_hf_folder

    t_path, d_path = tmp_path_factory.mktemp("t8"), tmp_path_factory.mktemp("d8")
    build_tiny("llama", t_path, seed=3, vocab=8)
    build_tiny("llama", d_path, layers=1, seed=4, vocab=8)
    t, d = load_hf_folder(t_path), load_hf_folder(d_path)
    cfg = t.cfg.replace(eos_token_ids=())
    return to_device(t.params, cfg), cfg, DraftModel(d.cfg), to_device(d.params, d.cfg)


def _exact_two_token_law(params, cfg, prompt, s):
    seqs = np.array([prompt + [x] for x in range(cfg.vocab_size)])
    t = seqs.shape[1]
    logits, _, _ = forward(params, cfg, jnp.asarray(seqs), jnp.broadcast_to(jnp.arange(t), seqs.shape), None,
                           causal_mask(len(seqs), t))  # fmt: skip
    p1 = np.asarray(probabilities(logits[0, -2], s), np.float64)
    p2 = np.asarray(probabilities(logits[:, -1], s), np.float64)
    return p1[:, None] * p2


@pytest.mark.parametrize(
    "tree,verifier",
    [("chain:2", "speculative"), ("rsd:2,2", "rrs"), ("static:[(0,),(1,),(0,0),(1,0)]", None),
     ("rsd:3,1", None), ("dynamic:depth=2,topk=2,n=5", "target_only"), ("chain:2,sample", "rrs"),
     ("chain:2+budget:4000", "speculative"), ("chain:2,sample+budget:4000", None)],
)  # fmt: skip
def test_sampled_two_token_law_is_the_targets(small_vocab, tree, verifier):
    params, cfg, d, dp = small_vocab
    s = SamplingConfig(temperature=1.0)
    prompt = [1, 2, 3]
    n = 4000  # rows of one batch: independent samples
    verify = verifier and get_verifier(verifier)
    out = generate(params, cfg, [prompt] * n, max_new_tokens=2, sampling=s, drafter=d, draft_params=dp,
                   builder=parse_tree(tree), verifier=verify, seed=11)  # fmt: skip
    pairs = np.array([r[:2] for r in out.tokens])
    counts = np.bincount(pairs[:, 0] * 8 + pairs[:, 1], minlength=64).astype(np.float64)
    expected = _exact_two_token_law(params, cfg, prompt, s).ravel() * n
    keep = expected >= 5
    obs, exp = counts[keep], expected[keep]
    if (~keep).any():  # merge the rare cells into one
        obs, exp = np.append(obs, counts[~keep].sum()), np.append(exp, expected[~keep].sum())
    _, pval = stats.chisquare(obs, exp * obs.sum() / exp.sum())
    assert pval > 1e-4, (tree, verifier, pval)
    jax.clear_caches()


def test_docs_custom_drafter_runs_losslessly(setup):
    import pathlib
    import re

    params, cfg, ar, _ = setup
    doc = (pathlib.Path(__file__).parents[1] / "docs" / "drafters.md").read_text()
    code = re.findall(r"```python\n(.*?)```", doc, re.S)[-1]
    ns: dict = {}
    exec(code, ns)
    d = ns["RepeatDrafter"](cfg.vocab_size)
    out = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, drafter=d, builder=parse_tree("chain:2"))
    assert out.tokens == ar
    assert all(t >= 0 for row in out.tokens for t in row)  # no PAD sentinel in any output
