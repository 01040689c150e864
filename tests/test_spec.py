"""The speculative loop end to end at temperature 0: the output equals AR token for token for every
builder × verifier × training-free drafter and for ragged batches; a perfect drafter's acceptance is
exact. Torch-free (tiny checkpoints from `write_tiny`). The sampled distribution at T > 0, with
negative controls, is test_spec_stats.py's."""

from __future__ import annotations

import itertools
import json

import pytest

from specdec.drafters import DraftModel, NGram, layer_skip
from specdec.generate import generate
from specdec.loading import load_hf_folder
from specdec.models import to_device
from specdec.trees import parse_tree
from specdec.verifiers import get_verifier
from tests.conftest import write_tiny

# Repetitive prompts so that n-gram lookup finds matches; a third row of different length.
PROMPTS = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13], list(range(20, 45))]
N_NEW = 20
TREES = ["chain:3", "static:[(0,),(1,),(0,0),(0,1),(1,0),(0,0,0)]", "dynamic:depth=3,topk=3,n=10",
         "dyspec:n=8", "rsd:2,2,1", "rsd-beam:depth=3,beam=2",
         "chain:3+budget:2", "dynamic:depth=3,topk=3,n=10+budget:5"]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny_targets, tmp_path_factory):
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    path = tmp_path_factory.mktemp("draft")
    write_tiny("llama", path, layers=1, seed=7)  # a different random model drafting
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


# --- a perfect drafter: its acceptance is exact ----------------------------------------------------------
# The target drafting for itself at temperature 0 proposes the target's own argmax, so greedy
# verification accepts every node of the tree that lies on the AR continuation. A step from a row
# with g tokens generated (prefill's included) emits min(a + 1, N_NEW - g) tokens: the a accepted
# drafts and the bonus, cut by max_new_tokens. `accepted_hist[k]` counts the row-steps that
# emitted k tokens; `tau` = their mean over row-steps (prefill's token excluded).
def perfect_drafter_hist(ar, trace_path, max_depth):
    """accepted_hist a perfect drafter must produce, from the trees the step trace recorded
    (`generate(trace=...)`: its nodes and cache lengths only, not what was accepted): per step and
    running row, descend the row's tree along the AR continuation (node 0 = the root)."""
    hist = [0] * (max_depth + 2)
    for line in trace_path.read_text().splitlines():
        rec = json.loads(line)
        r = rec["row"]
        g = rec["cache_before"] - len(PROMPTS[r]) + 1  # generated so far: the cache lacks the root
        nodes = rec["nodes"]  # [index, token, parent] of every valid node
        node, a = 0, 0
        while g + a < N_NEW:
            kids = [i for i, tok, parent in nodes if parent == node and tok == ar[r][g + a]]
            if not kids:
                break
            node, a = kids[0], a + 1
        hist[min(a + 1, N_NEW - g)] += 1
    return hist


def full_depth_hist(depth: int, rows: int = len(PROMPTS)) -> list[int]:
    """accepted_hist when every step accepts a whole depth-`depth` path: after prefill's token the
    N_NEW - 1 others come depth + 1 per step, the last step cut to the remainder."""
    hist = [0] * (depth + 2)
    full, rest = divmod(N_NEW - 1, depth + 1)
    hist[depth + 1] += full * rows
    if rest:
        hist[rest] += rows
    return hist


# The trees holding the target's greedy chain to their full depth 3 whatever the drafter's logits:
# a chain, a static tree with the path (0, 0, 0), RSD with >= 1 child per depth at T = 0 (top-k).
FULL_DEPTH = ("chain:3", "static:[(0,),(1,),(0,0),(0,1),(1,0),(0,0,0)]", "rsd:2,2,1")


def test_full_depth_formula():
    """The closed form at N_NEW = 20, depth 3: 19 tokens in 5 steps of 4, 4, 4, 4, 3: tau = 3.8."""
    assert full_depth_hist(3, rows=1) == [0, 0, 0, 1, 4]
    hist = full_depth_hist(3)
    assert sum(k * c for k, c in enumerate(hist)) / sum(hist) == pytest.approx(3.8)


# the target drafting for itself (exact histograms) and n-gram lookup on every builder; a different
# random model (partial acceptance of a draft model) on a chain, a dynamic tree and a budget
OTHER = ("chain:3", "dynamic:depth=3,topk=3,n=10", "dynamic:depth=3,topk=3,n=10+budget:5")


@pytest.mark.parametrize(
    "drafter,tree",
    list(itertools.product(["self", "ngram"], TREES)) + [("other", t) for t in OTHER],
)
def test_greedy_speculative_equals_ar_for_every_builder(setup, drafter, tree, tmp_path):
    perfect = drafter == "self"
    trace = tmp_path / "trace.jsonl" if perfect else None
    out = _run(setup, drafter, tree, trace=trace)
    assert out.tokens == setup[2]
    assert sum(k * c for k, c in enumerate(out.accepted_hist)) == sum(len(r) - 1 for r in out.tokens)
    if perfect:  # every verified node on the AR continuation is accepted: the histogram is exact
        depth = parse_tree(tree).max_depth  # (a budget's trace holds the pruned trees it verified)
        assert len(trace.read_text().splitlines()) == sum(out.row_steps)
        assert out.accepted_hist == perfect_drafter_hist(setup[2], trace, depth)
        if tree in FULL_DEPTH:
            assert out.accepted_hist == full_depth_hist(depth)
            assert out.tau == pytest.approx(3.8)  # 19 tokens after prefill's in 5 steps
    if "+budget" in tree:  # the batch verifies at most `budget` drafts per step, however many rows
        budget = parse_tree(tree).budget
        assert sum((k - 1) * c for k, c in enumerate(out.accepted_hist) if k) <= budget * out.steps


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
