"""The toy world and chi-square harness of the verifier losslessness tests (test_verifiers_stats.py,
test_verifiers_controls.py).

Toy world (reference notes C.3/C.4): the target and the draft are random logit tables indexed by the
whole prefix (an exact base-(V+1) encoding of the tokens so far), so both are genuine autoregressive
models and every path has its own distributions. Vocabularies are padded to V = 12 with -inf
logits, so one compiled verifier covers effective vocab sizes 3..12 (3..8 at depth 2, 3..6 at depth
3). Per case: 20 worlds (random effective vocab, logit scale, and draft/target relation: noisy copy,
p = q, unrelated, q with zeros, peaked q with a target with zeros) x 10000 rows, in one verifier call.

One row: draw the tree from the draft exactly as a builder would for its sibling mode (Gumbel-top-k
for without_replacement, independent categorical for iid, top-k for deterministic; numpy), look up
the target logits of every node, verify (jit), then complete the emitted tokens to L = depth + 1
with target samples. The first L tokens must follow the exact joint target distribution: scipy
chisquare per world (cells with expectation < 5 merged), summarised as the Bonferroni-corrected
minimum over the worlds and as the combined statistic. Lossless cases need both > 1e-4 (and no
impossible sequence); negative controls (the pitfalls of reference section F, injected here) must
reach < 1e-8.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import PAD, Tree

V = 12  # padded vocabulary; each world uses its first v_eff tokens
MAX_VOCAB = {1: 12, 2: 8, 3: 6}  # largest v_eff per tree depth (keeps V_eff^L cells well filled)
N_WORLDS = 20
PASS_P, FAIL_P = 1e-4, 1e-8


# ----------------------------------------------------------------------------------------------- worlds
def make_worlds(seed: int, depth: int, n_worlds: int = N_WORLDS):
    """(target logits [W, C, V], draft logits [W, C, V]) with C = (V+1)^depth prefix contexts."""
    rng = np.random.default_rng(seed)
    c = (V + 1) ** depth
    ps, qs = [], []
    for w in range(n_worlds):
        v_eff = int(rng.integers(3, MAX_VOCAB[depth] + 1))
        scale = rng.uniform(0.5, 2.5)
        p = rng.normal(size=(c, V)) * scale
        kind = w % 5
        if kind == 0:  # a noisy copy of the target
            q = p + rng.normal(size=(c, V)) * rng.uniform(0.3, 1.5)
        elif kind == 1:  # p == q: zero residual mass
            q = p.copy()
        elif kind == 2:  # an unrelated draft
            q = rng.normal(size=(c, V)) * scale
        elif kind == 3:  # a draft with zeros where the target has mass
            q = p + rng.normal(size=(c, V)) * 0.5
            q[rng.random((c, V)) < 0.3] = -np.inf
        else:  # a peaked draft, and a target with zeros
            q = (p + rng.normal(size=(c, V)) * 0.5) * 3
            p[rng.random((c, V)) < 0.25] = -np.inf
        for t in (p, q):
            t[:, v_eff:] = -np.inf
            t[:, 0] = np.where(np.isfinite(t[:, :v_eff]).any(1), t[:, 0], 0.0)  # keep >= 1 token
        ps.append(p)
        qs.append(q)
    return jnp.asarray(np.stack(ps), jnp.float32), jnp.asarray(np.stack(qs), jnp.float32)


def extend(h, x):
    """Context id of prefix + [x]: exact base-(V+1) encoding (digits 1..V)."""
    return h * (V + 1) + x + 1


# ------------------------------------------------------------------------------------------------ trees
@dataclasses.dataclass(frozen=True)
class Drafting:
    """How a toy builder draws children; the defaults are correct, the flags inject known bugs."""

    mode: str = "without_replacement"  # how the children are really drawn
    label: str | None = None  # sibling_mode recorded in the Tree (None: = mode)
    draft_temperature: float | None = None  # draw at this temperature, record q at the nominal one
    resort: bool = False  # re-sort drawn siblings by q (verify in a different order than drawn)


def bfs_layout(shape: tuple[int, ...]):
    """Complete tree with branching `shape`, breadth first: (parents [N], depth [N])."""
    parents, depth, prev = [-1], [0], [0]
    for d, k in enumerate(shape, 1):
        cur = list(range(len(parents), len(parents) + len(prev) * k))
        parents += [p for p in prev for _ in range(k)]
        depth += [d] * len(cur)
        prev = cur
    return np.array(parents), np.array(depth)


def draw(rng, q: np.ndarray, k: int, mode: str):
    """k children per row of q [M, V] (probabilities): (tokens [M, k], present [M, k])."""
    with np.errstate(divide="ignore"):
        logq = np.log(q)
    if mode == "iid":  # inverse CDF
        cdf = np.cumsum(q, -1)
        u = rng.random((q.shape[0], k, 1)) * cdf[:, None, -1:]
        return np.minimum((cdf[:, None, :] <= u).sum(-1), V - 1), np.ones((q.shape[0], k), bool)
    if mode == "without_replacement":  # Gumbel-top-k, in key order
        keys = logq + rng.gumbel(size=q.shape)
        kids = np.argsort(-keys, axis=1, kind="stable")[:, :k]
        return kids, np.isfinite(np.take_along_axis(keys, kids, 1))  # support < k: the rest absent
    return np.argsort(-q, axis=1, kind="stable")[:, :k], np.ones((q.shape[0], k), bool)  # top-k


class Toy:
    """One case's worlds under one SamplingConfig: tables, tree drafting, target completion."""

    def __init__(self, seed: int, depth: int, sampling: SamplingConfig):
        self.p_logits, q_logits = make_worlds(seed, depth)
        self.sampling = sampling
        self.q32 = np.asarray(probabilities(q_logits, sampling))  # what verifiers are told
        self.q_logits = q_logits
        self.p64 = np.asarray(probabilities(self.p_logits, sampling), np.float64)
        self.p64 /= self.p64.sum(-1, keepdims=True)
        self.n_ctx = self.p64.shape[1]

    def ctx(self, h, x):
        """Context of prefix + [x]; prefixes past the compared length share the last id (still a
        function of the prefix, so still an autoregressive model; compared positions are exact)."""
        return np.minimum(extend(h, x), self.n_ctx - 1)

    def build(self, rng, world, h0, shape, drafting: Drafting) -> tuple[Tree, jax.Array]:
        """Draft a tree per row from root contexts h0 [R]; return (tree, target_logits)."""
        q_draw = self.q32
        if drafting.draft_temperature is not None:  # BUG: drawn at another temperature than recorded
            cfg = dataclasses.replace(self.sampling, temperature=drafting.draft_temperature)
            q_draw = np.asarray(probabilities(self.q_logits, cfg))
        parents, depth = bfs_layout(shape)
        r, n = len(world), len(parents)
        h = np.zeros((r, n), np.int64)
        h[:, 0] = h0
        tokens = np.full((r, n), PAD, np.int32)
        valid = np.zeros((r, n), bool)
        valid[:, 0] = True
        prev = np.array([0])
        for k in shape:
            cur = np.arange(prev[-1] + 1, prev[-1] + 1 + len(prev) * k)
            q = q_draw[world[:, None], h[:, prev]].astype(np.float64).reshape(-1, V)
            kids, ok = draw(rng, q / q.sum(-1, keepdims=True), k, drafting.mode)
            if drafting.resort:  # BUG: verify in q order instead of drawing order
                order = np.argsort(-np.take_along_axis(q, kids, 1), axis=1, kind="stable")
                kids, ok = np.take_along_axis(kids, order, 1), np.take_along_axis(ok, order, 1)
            kids, ok = kids.reshape(r, -1), ok.reshape(r, -1) & np.repeat(valid[:, prev], k, axis=1)
            tokens[:, cur] = np.where(ok, kids, PAD)
            valid[:, cur] = ok
            h[:, cur] = np.where(ok, self.ctx(np.repeat(h[:, prev], k, axis=1), kids), 0)
            prev = cur
        tree = Tree(
            tokens=jnp.asarray(tokens),
            parents=jnp.asarray(np.broadcast_to(parents, (r, n)), jnp.int32),
            depth=jnp.asarray(np.broadcast_to(depth, (r, n)), jnp.int32),
            valid=jnp.asarray(valid),
            draft_probs=jnp.asarray(self.q32[world[:, None], h]),
            max_depth=len(shape),
            sibling_mode=drafting.label or drafting.mode,
        )
        return tree, jnp.asarray(np.asarray(self.p_logits)[world[:, None], h])

    def complete(self, rng, world, prefix: np.ndarray, count: np.ndarray, length: int) -> np.ndarray:
        """The first `length` tokens: prefix[:, :count], then target samples (inverse CDF)."""
        seq = np.zeros((len(world), length), np.int64)
        h = np.zeros(len(world), np.int64)
        for t in range(length):
            cdf = np.cumsum(self.p64[world, h], -1)
            drawn = np.minimum((cdf <= rng.random((len(world), 1)) * cdf[:, -1:]).sum(-1), V - 1)
            seq[:, t] = np.where(t < count, prefix[:, t] if t < prefix.shape[1] else 0, drawn)
            h = self.ctx(h, seq[:, t])
        return seq


_JITTED: dict = {}


def jitted(verifier):
    """One jit wrapper per verifier object, so a case shape compiles once per test session."""
    if verifier not in _JITTED:
        _JITTED[verifier] = jax.jit(lambda t, lg, k, s: verifier(t, lg, k, s), static_argnums=3)
    return _JITTED[verifier]


def sequences(verifier, toy: Toy, shape, drafting: Drafting, *, seed=0, rows=10_000, steps=1, reuse=False):
    """(sequences [R, L], world [R]) with L = len(shape) + 1: `steps` speculative steps (each step a
    fresh tree from the committed prefix), then target samples. reuse=True: one key for all steps."""
    rng = np.random.default_rng(seed)
    world = np.repeat(np.arange(N_WORLDS), rows)
    length = len(shape) + 1
    prefix = np.zeros((len(world), steps * length), np.int64)
    count, h0 = np.zeros(len(world), np.int64), np.zeros(len(world), np.int64)
    verify = jitted(verifier)
    for step in range(steps):
        tree, logits = toy.build(rng, world, h0, shape, drafting)
        key = jax.random.key(seed * 1000 + (0 if reuse else step))
        v = jax.device_get(verify(tree, logits, key, toy.sampling))
        tokens = np.asarray(tree.tokens)
        emitted = np.take_along_axis(tokens, v.path[:, 1:], axis=1)
        emitted = np.concatenate([emitted, np.zeros((len(world), 1), np.int64)], axis=1)
        np.put_along_axis(emitted, v.n_accepted[:, None], v.next_token[:, None], axis=1)
        for t in range(length):
            put = t <= v.n_accepted
            prefix[put, count[put] + t] = emitted[put, t]
        count = count + v.n_accepted + 1
        h0 = np.zeros(len(world), np.int64)  # the next step's root context: the committed prefix
        for t in range(prefix.shape[1]):
            h0 = np.where(t < count, toy.ctx(h0, prefix[:, t]), h0)
    return toy.complete(rng, world, prefix, count, length), world


def exact_joint(pt: np.ndarray, length: int) -> np.ndarray:
    """[W, V^length] exact probability of every sequence (first token most significant) under the
    per-context target distributions pt [W, C, V]."""
    w = pt.shape[0]
    joint, h = np.ones((w, 1)), np.zeros((1,), np.int64)
    for _ in range(length):
        joint = (joint[:, :, None] * pt[:, h, :]).reshape(w, -1)
        h = (h[:, None] * (V + 1) + np.arange(V) + 1).reshape(-1)
    return joint


@dataclasses.dataclass
class ChiSquare:
    p_worlds: np.ndarray  # per-world p-values
    combined: float  # p-value of the summed statistic
    impossible: int  # sequences with target probability 0 that were emitted

    @property
    def bonferroni(self) -> float:
        return float(min(1.0, self.p_worlds.min() * len(self.p_worlds)))

    @property
    def worst(self) -> float:
        return 0.0 if self.impossible else min(self.bonferroni, self.combined)


def chi_square(seqs: np.ndarray, world: np.ndarray, joint: np.ndarray) -> ChiSquare:
    length = seqs.shape[1]
    cell = (seqs * V ** np.arange(length - 1, -1, -1)).sum(1)
    pvals, total_stat, total_dof, impossible = [], 0.0, 0, 0
    for w in range(joint.shape[0]):
        obs = np.bincount(cell[world == w], minlength=V**length).astype(np.float64)
        exp = joint[w] * obs.sum()
        impossible += int(obs[joint[w] == 0].sum())
        big = exp >= 5
        o, e = list(obs[big]), list(exp[big])
        rest = exp[~big & (joint[w] > 0)].sum()
        if rest > 0:  # merge the tiny cells; if still tiny, into the smallest big cell
            if rest >= 5 or not e:
                o.append(obs[~big & (joint[w] > 0)].sum())
                e.append(rest)
            else:
                i = int(np.argmin(e))
                o[i] += obs[~big & (joint[w] > 0)].sum()
                e[i] += rest
        if len(e) < 2:
            continue
        stat, p = stats.chisquare(np.array(o), np.array(e) * (sum(o) / sum(e)))
        pvals.append(p)
        total_stat += stat
        total_dof += len(e) - 1
    return ChiSquare(np.array(pvals), float(stats.chi2.sf(total_stat, total_dof)), impossible)


def check(verifier, shape, drafting: Drafting, sampling: SamplingConfig, *, seed=0, **kw) -> ChiSquare:
    """Run one case over N_WORLDS worlds and return its ChiSquare."""
    toy = Toy(seed, len(shape), sampling)
    seqs, world = sequences(verifier, toy, shape, drafting, seed=seed, **kw)
    return chi_square(seqs, world, exact_joint(toy.p64, len(shape) + 1))


# Sampling settings and drafting modes shared by the cases and the controls.
T1 = SamplingConfig(1.0)
T07K = SamplingConfig(0.7, top_k=4)
T13P = SamplingConfig(1.3, top_p=0.85)
T05 = SamplingConfig(0.5)
WOR, IID, DET = Drafting("without_replacement"), Drafting("iid"), Drafting("deterministic")
