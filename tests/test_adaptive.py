"""Adaptive draft lengths (SpecDec++'s stop rule, `trees/adaptive.py`): the rule against hand-computed
lengths (the one-token lag, the bounds, per row), the training-free sources (draft confidence,
n-gram lookup's acceptance history), bucketed verification widths, and temperature-0 parity with
AR for chains and dynamic trees with every training-free drafter. The sampled law through the loop,
with a broken stop rule that must fail, is test_spec_stats.py's."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.context import Context
from specdec.drafters import DraftModel, NGram, layer_skip
from specdec.generate import generate
from specdec.loading import load_hf_folder
from specdec.models import to_device
from specdec.sampling import SamplingConfig
from specdec.tree import Tree, compact
from specdec.trees import check_tree, parse_tree
from specdec.trees.adaptive import AdaptiveTree, chain_lengths, default_widths, stop_depths
from specdec.trees.static import chain
from tests.conftest import write_tiny

V = 16
T0 = SamplingConfig(0.0)


@dataclasses.dataclass(frozen=True)
class Scripted:
    """Drafts token d + 1 at depth d + 1 with draft probability `conf[b][d]`; its acceptance
    estimate of a node at depth d is `accept[b][d - 1]` (None: no `acceptance` member)."""

    conf: tuple[tuple[float, ...], ...]
    accept: tuple[tuple[float, ...], ...] | None = None
    vocab_size: int = V
    taps: tuple[int, ...] = ()

    def _logits(self, depth):  # [B, F] depths of the nodes whose children are drafted
        c = jnp.asarray(self.conf, jnp.float32)
        q = jnp.take_along_axis(c, jnp.clip(depth, 0, c.shape[1] - 1), axis=1)  # top token's probability
        rest = (1 - q) / (V - 1)
        probs = jnp.where(jax.nn.one_hot(depth + 1, V, dtype=bool), q[..., None], rest[..., None])
        return jnp.log(probs)

    def init(self, params, ctx, prompt, prefill_taps, cache_size, *, window):
        return None

    def begin(self, params, state, ctx):
        return self._logits(jnp.zeros((ctx.root.shape[0], 1), jnp.int32))[:, 0], state

    def expand(self, params, state, ctx, tree, frontier):
        return self._logits(jnp.take_along_axis(tree.depth, frontier, axis=1)), state

    def update(self, params, state, ctx, tree, verdict, taps):
        return state

    @property
    def acceptance(self):
        if self.accept is None:
            return None

        def estimate(params, state, ctx, tree, nodes, sampling):
            a = jnp.asarray(self.accept, jnp.float32)
            depth = jnp.take_along_axis(tree.depth, nodes, axis=1)
            return jnp.take_along_axis(a, jnp.clip(depth - 1, 0, a.shape[1] - 1), axis=1)

        return estimate


def _build(builder, drafter, running=None):
    b = len(drafter.conf)
    ctx = Context(tokens=jnp.zeros((b, 8), jnp.int32), lengths=jnp.full((b,), 3, jnp.int32),
                  running=None if running is None else jnp.asarray(running))  # fmt: skip
    tree, _ = jax.jit(lambda: builder(drafter, None, None, ctx, jax.random.key(0), T0))()
    check_tree(tree, V)
    return tree


def test_stop_rule_with_acceptance_estimates_by_hand():
    # h = 0.5: draft node d + 1 while prod_{j <= d} a_j >= 0.5 (or d + 1 <= min = 2), up to depth 6.
    accept = ((0.9, 0.8, 0.6, 0.9, 0.9, 0.9),  # 0.9, 0.72, 0.43 -> nodes 1..3: length 3
              (0.3, 0.9, 0.9, 0.9, 0.9, 0.9),  # 0.3 < 0.5, but min = 2 keeps depth 2: length 2
              (1.0, 1.0, 1.0, 1.0, 1.0, 1.0),  # never stops: the bound, depth 6
              (0.5, 1.0, 0.9, 0.9, 0.9, 0.9))  # min keeps 2; 0.5 is not below 1 - h: 3; 0.45: 3  # fmt: skip
    drafter = Scripted(conf=((0.99,) * 7,) * 4, accept=accept)
    builder = AdaptiveTree(chain(6), threshold=0.5, min_length=2)
    tree = _build(builder, drafter)
    assert chain_lengths(tree).tolist() == [3, 2, 6, 3]
    assert stop_depths(accept, 0.5, 2, 6) == [3, 2, 6, 3]  # the host reference agrees
    # the lag: node d's estimate comes from the expand that drafts node d + 1, so a row stopping at
    # length 3 cost begin + 3 expands; the batch drafts until its longest row stops (6 calls)
    assert int(tree.draft_calls) == 6
    assert tree.tokens[0, :4].tolist() == [0, 1, 2, 3] and not tree.valid[0, 4:].any()
    # one row alone stops the loop early: begin + 2 expands, the third drafts a node the rule drops
    alone = _build(builder, Scripted(conf=((0.99,) * 7,), accept=accept[:1]))
    assert chain_lengths(alone).tolist() == [3] and int(alone.draft_calls) == 4


def test_stop_rule_with_draft_confidence_counts_the_node_itself():
    # No acceptance member: a deterministic draft's own q joins its survival (q is known when drafted).
    conf = ((0.9, 0.9, 0.5, 0.9, 0.9), (0.6, 0.9, 0.9, 0.9, 0.9), (0.99,) * 5)
    tree = _build(AdaptiveTree(chain(4), threshold=0.3), Scripted(conf=conf))
    # 1 - h = 0.7: row 0: 0.9, 0.81, 0.405 -> 2; row 1: 0.6 < 0.7 but min = 1 keeps node 1; row 2: 4
    assert chain_lengths(tree).tolist() == [2, 1, 4]


@pytest.mark.parametrize("spec", ["chain:5+adaptive:h=0.5", "dynamic:depth=5,topk=2,n=8+adaptive:h=0.5"])
def test_finished_rows_draft_nothing_and_do_not_hold_the_loop(spec):
    """A row the loop marks finished (`Context.running`) gets no drafts past depth 1 (a dynamic tree's
    first round is drafted by `begin` for every row), so a finished row whose drafts would go on
    never keeps the while loop running for the others."""
    builder = parse_tree(spec)
    drafter = Scripted(conf=((0.99,) * 6,) * 2, accept=((0.3,) * 5, (1.0,) * 5))  # row 0 stops at 1
    both = _build(builder, drafter)
    depth = lambda t: jnp.where(t.valid, t.depth, 0).max(axis=1).tolist()  # noqa: E731
    assert depth(both)[1] == 5 and int(both.draft_calls) == 5
    only0 = _build(builder, drafter, running=[True, False])
    assert depth(only0)[0] == 1 and depth(only0)[1] <= 1 and int(only0.draft_calls) <= 2


def test_dynamic_tree_stops_at_the_depth_no_path_survives():
    accept = ((0.9, 0.2, 0.9, 0.9), (0.9, 0.9, 0.9, 0.9))
    drafter = Scripted(conf=((0.99,) * 5,) * 2, accept=accept)
    builder = parse_tree("dynamic:depth=4,topk=2,n=8+adaptive:h=0.5")
    tree = _build(builder, drafter)
    depth = jnp.where(tree.valid, tree.depth, 0).max(axis=1).tolist()
    # row 0: every depth-2 node has survival 0.9, depth 3: 0.18 < 0.5 -> no depth 3; row 1: deeper
    assert depth == [2, 4]
    # valid nodes are in front (the bucketed verification reads a prefix)
    valid = np.asarray(tree.valid)
    assert all(not valid[b, np.argmin(valid[b]) :].any() for b in range(2) if not valid[b].all())


def test_compact_moves_valid_nodes_in_front_and_keeps_the_tree():
    tree = Tree(
        tokens=jnp.array([[7, -1, 3, 4, -1, 5]]), parents=jnp.array([[-1, -1, 0, 2, -1, 0]]),
        depth=jnp.array([[0, 0, 1, 2, 0, 1]]), valid=jnp.array([[True, False, True, True, False, True]]),
        max_depth=2,
    )  # fmt: skip
    out = compact(tree)
    assert out.tokens.tolist() == [[7, 3, 4, 5, -1, -1]]
    assert out.parents.tolist() == [[-1, 0, 1, 0, -1, -1]]
    assert out.depth.tolist() == [[0, 1, 2, 1, 0, 0]]
    check_tree(out, V)


def test_widths_specs_and_refusals():
    assert (
        default_widths(9) == (2, 4, 9) and default_widths(12) == (2, 4, 8, 12) and default_widths(3) == (2, 3)
    )
    specs = [
        "chain:8+adaptive",
        "chain:8,sample+adaptive:h=0.3",
        "dynamic:depth=6,topk=3,n=12+adaptive:min=2",
    ]
    for spec in specs + ["chain:8+adaptive:h=0.7+budget:6"]:
        assert parse_tree(spec).spec == spec and parse_tree(parse_tree(spec).spec) == parse_tree(spec)
    bad_specs = [
        ("static:eagle1+adaptive", "chain:K and dynamic"), ("chain:4+adaptive:h=1.5", "(0, 1)"),
        ("chain:4+adaptive:min=5", "min must be"), ("chain:4+adaptive:k=2", "expected h=, min="),
    ]  # fmt: skip
    for bad, why in bad_specs:
        with pytest.raises(ValueError, match="bad tree spec") as e:
            parse_tree(bad)
        assert why in str(e.value)


# ------------------------------------------------------------------------------ the loop, temperature 0
PROMPTS = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13], list(range(20, 45))]
N_NEW = 20


@pytest.fixture(scope="module")
def setup(tiny_targets, tmp_path_factory):
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    path = tmp_path_factory.mktemp("draft")
    write_tiny("llama", path, layers=1, seed=7)
    other = load_hf_folder(path)
    ar = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW).tokens
    drafters = {
        "self": (DraftModel(cfg), params),
        "other": (DraftModel(other.cfg.replace(eos_token_ids=())), to_device(other.params, other.cfg)),
        "layerskip": layer_skip(params, cfg, 1),
        "ngram": (NGram(cfg.vocab_size, max_depth=6), None),
    }
    return params, cfg, ar, drafters


CASES = [("chain:6+adaptive", "self"), ("chain:6+adaptive", "other"), ("chain:6+adaptive", "ngram"),
         ("dynamic:depth=4,topk=3,n=10+adaptive:h=0.3,min=2", "layerskip"),
         ("dynamic:depth=4,topk=3,n=10+adaptive:h=0.3,min=2", "ngram")]  # fmt: skip


@pytest.mark.parametrize("tree,drafter", CASES)
def test_greedy_adaptive_equals_ar(setup, tree, drafter):
    params, cfg, ar, drafters = setup
    d, dp = drafters[drafter]
    builder = parse_tree(tree)
    out = generate(
        params, cfg, PROMPTS, max_new_tokens=N_NEW, drafter=d, draft_params=dp, builder=builder, check=True
    )
    assert out.tokens == ar
    # the verification block is one of the compiled widths each step, never wider than the tree
    n, depth = builder.num_nodes, builder.max_depth
    assert 2 * out.steps <= out.verify_width <= n * out.steps
    if drafter == "self":  # the target drafting for itself: drafts are accepted, rows run long
        assert out.tau > 1.5
    if drafter == "other":  # an unrelated random drafter, rejected: fewer drafts and a narrower
        # block than the fixed chain:6 (6 drafter calls and 7 tokens per step)
        assert out.draft_calls < 0.6 * depth * out.steps and out.verify_width < 0.6 * n * out.steps


def test_ngram_acceptance_history_sets_the_length():
    ng = NGram(V, max_depth=6, max_n=2)
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 1, 2] + [0] * 7])
    ctx = Context(tokens=tokens, lengths=jnp.asarray([9]))
    state = ng.init(None, ctx, tokens[:, :8], (), 16, window=7)
    assert state.match_n.tolist() == [2] and state.proposal[0, :6].tolist() == [3, 4, 5, 6, 7, 1]
    builder = AdaptiveTree(chain(6), threshold=0.5)
    run = lambda st: jax.jit(lambda s: builder(ng, None, s, ctx, jax.random.key(0), T0)[0])(st)
    # no history: a = 1/2, so node 2 survives (0.5 >= 0.5) and node 3 does not
    assert chain_lengths(run(state)).tolist() == [2]
    # a history of 9 accepted in 10 verified at every depth for 2-token matches: a = 10/12 each,
    # 0.83^3 = 0.58 >= 0.5 > 0.83^4 -> length 4
    hist = state.replace(hits=state.hits.at[0, 2].set(9.0), trials=state.trials.at[0, 2].set(10.0))
    tree = run(hist)
    assert chain_lengths(tree).tolist() == [4]
    # ... recorded by update: a step that drafted 4 and accepted 2 verified depths 1..3 (the third
    # rejected): hits at depths 1, 2; trials at 1..3; depth 4 untouched (no decay either)
    verdict = type("V", (), {"n_accepted": jnp.asarray([2])})()
    new = ng.update(None, hist, ctx, tree, verdict, ())
    np.testing.assert_allclose(new.hits[0, 2, :4], [9 * 0.9 + 1, 9 * 0.9 + 1, 9 * 0.9, 9])
    np.testing.assert_allclose(new.trials[0, 2, :4], [10 * 0.9 + 1] * 3 + [10])
    assert float(new.trials[0, 1].sum()) == 0  # other match lengths keep their history
