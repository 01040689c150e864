"""End-to-end losslessness at temperature > 0: the tokens `generate()` emits follow the target's law.

The verifier tests (test_verifiers_stats.py) check one verification in isolation; this module runs
the whole decode loop (prefill, drafting with a real builder, the tree forward, verification,
commit, drafter update, the next step) and compares what comes out with the exact autoregressive
law of the target, computed from the target's own logits.

World: a tiny random Llama target over a vocabulary of V = 8 with scaled-up weights and head
(`write_tiny(std=0.3, head_std=0.6)`: logits with standard deviation ~4.8, the most likely token
0.69 on average, and distributions that depend on the context), drafted by its own first layer
(`layer_skip`): a real drafter, related to the target but different (more peaked, top token 0.81
on average; total variation 0.59 from the target), so steps both accept (reaching depth 2 and its
bonus token) and reject (a correction from the residual).

Harness: ROWS = 3000 copies of one prompt in one batch (rows draw independent randomness), L = 4 new
tokens per row, so every depth-2 tree contributes its accepted drafts, its correction and, after a
fully accepted path, the bonus token; prefill's token is the first of the four. The joint law of
the 4 tokens (V^4 cells) is the product of the target's next-token distributions; scipy's
chi-square over the cells with expectation >= 5 (the rest merged into one cell) must give
p > PASS_P for every lossless case, no emitted sequence may have probability 0, and the broken
verifiers of the negative controls, run through the same harness, must give p < FAIL_P: proof that
the harness has the power to see the bugs it guards against. (Measured: chi-square 28592 and 1828
on 61 degrees of freedom, p below float range; with 500 rows still p ~ 1e-150 and 1e-25. Every
case compiles its own loop, ~4 s; running the rows costs ~1 s.)

Pairings: every tree kind (chain, chain with ",sample", static, dynamic, dyspec, rsd, rsd-beam, a
batch budget over deterministic and over sampled siblings, adaptive lengths on sampled chains and
dynamic trees, stopping on the draft's confidence or on an acceptance estimate (`Accepting`
below), fused trees (prompt lookup's candidates merged into sampled and top-k model trees;
retrieval mixed into a without-replacement sibling set is a negative control), and an i.i.d.
tree, `IIDTree` below: no shipped builder draws i.i.d. siblings, which SpecInfer and SpecTr
require) with every lossless
verifier that accepts its sibling mode (speculative: chains; specinfer, spectr: i.i.d.; rrs,
target_only, auto: any), at T = 1, T = 0.8 with top-k 5 and T = 1.2 with top-p 0.9. greedy is
the temperature-0 verifier (test_spec.py checks that it equals AR token for token).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from specdec.cache import causal_mask
from specdec.drafters import DraftModel, NGram, layer_skip
from specdec.drafters.fused import Fused
from specdec.generate import generate
from specdec.loading import load_hf_folder
from specdec.models import forward, to_device
from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import PAD, Tree, ancestor_closed
from specdec.trees import FusedTree, fit, parse_tree
from specdec.verifiers import get_verifier, rrs, walk
from tests.conftest import write_tiny

V = 8
PROMPT = [3, 4, 5, 6]
L = 4  # tokens compared per row: prefill's, then the first speculative step's (and the next's)
ROWS = 3000
PASS_P, FAIL_P = 1e-3, 1e-6
T1 = SamplingConfig(1.0)
T08K = SamplingConfig(0.8, top_k=5)  # zero-probability tokens: impossible sequences must never appear
T12P = SamplingConfig(1.2, top_p=0.9)


# ------------------------------------------------------------------------------------- an i.i.d. tree
@dataclasses.dataclass(frozen=True)
class IIDTree:
    """A complete tree with `shape[d]` children per node at depth d, each child drawn independently
    from the draft distribution (repeats possible): sibling_mode "iid", what SpecInfer's MSS and
    SpecTr's K-SEQ verify. Breadth-first layout (parents precede children, siblings contiguous)."""

    shape: tuple[int, ...]

    @property
    def levels(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(frontier nodes, their children) per drafting round; node 0 is the root."""
        out, frontier, nxt = [], np.array([0]), 1
        for k in self.shape:
            children = np.arange(nxt, nxt + len(frontier) * k)
            out.append((frontier, children))
            frontier, nxt = children, nxt + len(children)
        return out

    @property
    def num_nodes(self) -> int:
        return 1 + sum(len(c) for _, c in self.levels)

    @property
    def max_depth(self) -> int:
        return len(self.shape)

    @property
    def window(self) -> int:
        return self.num_nodes

    def sibling_mode(self, sampling: SamplingConfig) -> str:
        return "iid"

    def __call__(self, drafter, params, state, ctx, key, sampling):
        root = ctx.root
        b, n = root.shape[0], self.num_nodes
        tree = Tree.empty(root, n, self.max_depth, sibling_mode="iid")
        logits, state = drafter.begin(params, state, ctx)
        logits = logits[:, None]  # [B, 1, V]: the root is the first frontier
        probs = jnp.zeros((b, n, logits.shape[-1]), jnp.float32)
        for d, ((frontier, children), k) in enumerate(zip(self.levels, self.shape, strict=True)):
            front = jnp.broadcast_to(jnp.asarray(frontier, jnp.int32), (b, len(frontier)))
            if d:
                logits, state = drafter.expand(params, state, ctx, tree, front)
            q = probabilities(logits, sampling)  # [B, F, V]: what the children are drawn from
            probs = probs.at[:, frontier].set(q)
            draws = jax.random.categorical(jax.random.fold_in(key, d), jnp.log(q)[:, :, None, :],
                                           shape=(b, len(frontier), k))  # fmt: skip
            tree = tree.replace(
                tokens=tree.tokens.at[:, children].set(draws.reshape(b, -1).astype(jnp.int32)),
                parents=tree.parents.at[:, children].set(jnp.asarray(np.repeat(frontier, k), jnp.int32)),
                depth=tree.depth.at[:, children].set(d + 1),
                valid=tree.valid.at[:, children].set(True),
            )
        return tree.replace(draft_probs=probs), state


# ------------------------------------------------------------------------- adaptive-length drafts
@dataclasses.dataclass(frozen=True)
class Accepting(DraftModel):
    """The layer-skip drafter with an acceptance estimate (as a trained head would give): a node's
    token below V / 2 is "likely accepted" (0.9), others not (0.3). It reads the node's own token,
    which the lag allows: the estimate only decides whether the node's children are drafted."""

    @property
    def acceptance(self):
        return lambda params, state, ctx, tree, nodes, sampling: jnp.where(
            jnp.take_along_axis(tree.tokens, nodes, axis=1) < V // 2, 0.9, 0.3
        )


@dataclasses.dataclass(frozen=True)
class KeepLikelyDrafts:
    """BROKEN stop rule: drops every sampled draft whose own draft probability q(token) is below
    `floor` (with its subtree). Selecting a sampled token by its own q leaves the kept drafts no
    longer distributed as q, which the verifier assumes (`trees/adaptive.py` uses E_q[q] instead)."""

    inner: object
    floor: float = 0.5

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, drafter, params, state, ctx, key, sampling):
        tree, state = self.inner(drafter, params, state, ctx, key, sampling)
        par = jnp.maximum(tree.parents, 0)
        q_par = jnp.take_along_axis(tree.draft_probs, par[..., None], axis=1)  # [B, N, V]: q at the parent
        q_own = jnp.take_along_axis(q_par, jnp.maximum(tree.tokens, 0)[..., None], axis=2)[..., 0]
        keep = ancestor_closed(tree.valid & (q_own >= self.floor), tree.parents, tree.max_depth)
        cut = dict(tokens=jnp.where(keep, tree.tokens, PAD), parents=jnp.where(keep, tree.parents, -1),
                   depth=jnp.where(keep, tree.depth, 0))  # fmt: skip
        return tree.replace(valid=keep, **cut), state


@dataclasses.dataclass(frozen=True)
class FusedIntoSampled(FusedTree):
    """BROKEN fusion: retrieval nodes merged into a tree of sampled siblings that keeps the inner
    tree's "without_replacement" label, so RRS treats a retrieval child as a draw from the
    residual draft distribution (`trees/fused.py` declares the fused tree deterministic)."""

    def sibling_mode(self, sampling):
        return self.inner.sibling_mode(sampling)

    def __call__(self, drafter, params, state, ctx, key, sampling):
        tree, state = super().__call__(drafter, params, state, ctx, key, sampling)
        return tree.replace(sibling_mode=self.sibling_mode(sampling)), state


# -------------------------------------------------------------------------------- broken verifiers
def accept_any_draft(tree, target_logits, key, sampling):
    """BROKEN: descends into the first candidate child whose draft probability is > 0 (every sampled
    draft), then emits the bonus from p. The output follows the draft, not the target."""

    def node(view):
        return walk.first_true(view.cand & (view.q[view.tokens] > 0)), view.p

    return walk.walk(tree, target_logits, key, sampling, node)


def resample_from_p_on_rejection(tree, target_logits, key, sampling):
    """BROKEN: RRS whose correction after a rejection is drawn from p instead of the residual
    norm((p - q)+): the classic speculative-sampling bug, which favours the tokens the draft
    over-proposes (they are emitted both by acceptance and by resampling)."""

    def rule(p, q, x, u):
        accept, _, q_next = rrs.conditional_rule(p, q, x, u)
        return accept, p, q_next  # the residual ignored

    return walk.walk(tree, target_logits, key, sampling, lambda v: walk.sibling_loop(v, rule))


# ------------------------------------------------------------------------------------------- harness
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(params, cfg, drafter, draft params, exact law [V^L] per SamplingConfig)."""
    path = tmp_path_factory.mktemp("peaked")
    write_tiny("llama", path, layers=2, seed=1, vocab=V, std=0.3, head_std=0.6)
    loaded = load_hf_folder(path)
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    drafter, dparams = layer_skip(params, cfg, 1)
    # The target's logits after every prefix PROMPT + x_1..x_j (j < L) in one forward: all V^(L-1)
    # continuations, read at the positions before x_1 .. x_L.
    seqs = np.array([PROMPT + list(x) for x in itertools.product(range(V), repeat=L - 1)])
    t = seqs.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t), seqs.shape)
    logits, _, _ = forward(params, cfg, jnp.asarray(seqs), pos, None, causal_mask(len(seqs), t))
    # [V^(L-1), L, V]: row x_1..x_{L-1}, step j -> p(x_{j+1} | x_1..x_j)
    logits = logits[:, len(PROMPT) - 1 :]

    def law(sampling: SamplingConfig) -> np.ndarray:
        p = np.asarray(probabilities(logits, sampling), np.float64)
        p /= p.sum(-1, keepdims=True)
        joint = np.ones(1)
        for j in range(L):  # joint over x_1..x_{j+1}; row index of prefix x_1..x_j is x * V^(L-1-j)
            rows = np.arange(V**j) * V ** (L - 1 - j)
            joint = (joint[:, None] * p[rows, j]).reshape(-1)
        return joint

    return params, cfg, drafter, dparams, law


def chi_square(tokens: list[list[int]], law: np.ndarray) -> tuple[float, int]:
    """(p-value, count of emitted sequences the target gives probability 0) of the first L tokens."""
    seqs = np.array([r[:L] for r in tokens])
    cell = (seqs * V ** np.arange(L - 1, -1, -1)).sum(1)
    obs = np.bincount(cell, minlength=V**L).astype(np.float64)
    impossible = int(obs[law == 0].sum())
    exp = law * len(seqs)
    big, rest = exp >= 5, (exp < 5) & (law > 0)
    o, e = obs[big], exp[big]
    if exp[rest].sum() > 0:
        o, e = np.append(o, obs[rest].sum()), np.append(e, exp[rest].sum())
    return float(stats.chisquare(o, e * o.sum() / e.sum()).pvalue), impossible


def emitted(world, tree, verifier, sampling, seed=0):
    """generate() on ROWS copies of PROMPT: its GenerateOutput. A tree "accepting:SPEC" drafts with
    `Accepting` (the layer-skip drafter with an acceptance estimate)."""
    params, cfg, drafter, dparams, _ = world
    if isinstance(tree, str) and tree.startswith("accepting:"):
        tree, drafter = tree.removeprefix("accepting:"), Accepting(drafter.cfg)
    fused = (isinstance(tree, str) and tree.startswith("fused:")) or isinstance(tree, FusedTree)
    if fused:  # the layer-skip drafter's tree with prompt lookup's candidates fused in
        drafter, dparams = Fused(drafter, (NGram(V, max_depth=3, paths=2),)), (dparams, (None,))
        tree = fit(parse_tree(tree.removeprefix("fused:")), drafter) if isinstance(tree, str) else tree
    builder = parse_tree(tree) if isinstance(tree, str) else tree
    verify = get_verifier(verifier) if isinstance(verifier, str) else verifier
    spec = dict(drafter=drafter, draft_params=dparams, builder=builder, verifier=verify)
    check = isinstance(builder, IIDTree)  # the test's own builder: check its trees' invariants too
    out = generate(
        params, cfg, [PROMPT] * ROWS, max_new_tokens=L, sampling=sampling, seed=seed, check=check, **spec
    )
    assert all(len(r) == L for r in out.tokens)
    return out


CASES = [  # (tree, verifier, sampling): every tree kind, every lossless verifier, three sampling settings
    ("chain:2,sample", "speculative", T1),
    ("chain:2,sample", "block", T1),  # block verification: the longest passing prefix
    # deterministic siblings (auto: target-only), pruned node by node by a batch budget: the 3000
    # depth-1 drafts and the 1500 most confident depth-2 ones are verified
    ("chain:2+budget:4500", "auto", T12P),
    ("static:[(0,),(1,),(0,0),(1,0)]", "target_only", T1),
    ("dynamic:depth=2,topk=2,n=5", "rrs", T1),  # rrs hands deterministic trees to target-only
    ("dyspec:n=5,topk=2", "auto", T1),
    ("rsd:2,2+budget:6000", "rrs", T12P),  # sampled siblings: a budget keeps whole rows (~half)
    ("rsd-beam:depth=2,beam=2", "auto", T08K),
    # adaptive lengths: sampled chains stop on E_q[q] (confidence) or on an acceptance estimate;
    # a dynamic tree (deterministic siblings) stops on its path's draft probability
    ("chain:2,sample+adaptive:h=0.5", "speculative", T1),
    ("chain:3,sample+adaptive:h=0.5", "block", T12P),
    ("accepting:chain:2,sample+adaptive:h=0.5", "speculative", T1),
    ("dynamic:depth=3,topk=2,n=6+adaptive:h=0.5", "auto", T08K),
    # fusion: sampled model siblings and retrieval candidates in one deterministic-sibling tree
    ("fused:chain:2,sample", "auto", T1),
    ("fused:dynamic:depth=2,topk=2,n=4", "rrs", T08K),
    (IIDTree((2, 2)), "specinfer", T1),
    (IIDTree((3, 1)), "spectr", T08K),
]


def case_id(case) -> str:
    tree, verifier, s = case
    name = tree if isinstance(tree, str) else f"iid{list(tree.shape)}"
    return f"{name}-{verifier}-T{s.temperature}-k{s.top_k}-p{s.top_p}"


@pytest.mark.parametrize("tree,verifier,sampling", CASES, ids=map(case_id, CASES))
def test_emitted_tokens_follow_the_target_law(world, tree, verifier, sampling):
    out = emitted(world, tree, verifier, sampling)
    pval, impossible = chi_square(out.tokens, world[4](sampling))
    print(f"{case_id((tree, verifier, sampling))}: p = {pval:.3g}, accepted_hist {out.accepted_hist}")
    # both branches exercised: first steps that accepted >= 2 drafts (3 tokens emitted: for a depth-2
    # tree the whole path, then its bonus) and steps that rejected the first draft (1 token emitted)
    assert out.accepted_hist[3] > 0 and out.accepted_hist[1] > 0
    assert impossible == 0
    assert pval > PASS_P, pval


CONTROLS = [  # (broken verifier, tree, sampling)
    (accept_any_draft, "chain:2,sample", T1),
    (resample_from_p_on_rejection, "rsd:2,2", T1),
    ("speculative", KeepLikelyDrafts(parse_tree("chain:2,sample")), T1),  # a stop rule that peeks
    ("rrs", FusedIntoSampled(parse_tree("chain:2,sample"), 2, 3), T1),  # retrieval among sampled siblings
]


def _control_id(c) -> str:
    return c[0].__name__ if callable(c[0]) else type(c[1]).__name__


@pytest.mark.parametrize("verifier,tree,sampling", CONTROLS, ids=map(_control_id, CONTROLS))
def test_negative_control_is_rejected(world, verifier, tree, sampling):
    """The same harness must reject each broken verifier or stop rule: otherwise a pass above means
    nothing."""
    out = emitted(world, tree, verifier, sampling)
    pval, impossible = chi_square(out.tokens, world[4](sampling))
    print(f"{_control_id((verifier, tree))}: p = {pval:.3g}, impossible {impossible}")
    assert pval < FAIL_P, pval
