"""Medusa-2 typical acceptance.  *** LOSSY: NOT A SAMPLER OF THE TARGET DISTRIBUTION. ***

    !!!  Output is NOT distributed as the target model's sampling, at any temperature > 0.  !!!
    !!!  It is a quality heuristic (a deterministic threshold on target probability).       !!!
    !!!  Use it only when you accept a different output distribution for speed.             !!!

Rule (FasterDecoding/Medusa `evaluate_posterior`, typical branch; reference notes B4): with
P = probabilities(target_logits, sampling) at a node and H = -sum P log(P + 1e-5), a child x of
that node passes when

    P(x) > min(epsilon, alpha * exp(-H))         epsilon = posterior_threshold, alpha = sqrt(epsilon)

The accepted path is the longest root path whose nodes all pass; among equally long ones the
highest sum of log P(x) wins (then the lowest node index). The emitted token is the target ARGMAX
after the last accepted node (Medusa's "greedy first token"), whatever the temperature. At
temperature 0 P is one-hot, so it reduces to `greedy`. Invalid and PAD nodes never pass.

Configure by instantiating: `TypicalAcceptance(posterior_threshold=0.09)` is a frozen, hashable
verifier (usable as a jit static argument); pass `posterior_alpha` to override sqrt(epsilon).
Medusa's own defaults differ between functions (0.09/0.3 vs 0.3/0.09): here they are explicit.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from specdec.sampling import SamplingConfig, probabilities
from specdec.tree import Tree, ancestor_mask, root_paths
from specdec.verifiers.protocol import Verdict

LOSSLESS = False
SIBLING_MODES = ("deterministic", "without_replacement", "iid")


@dataclasses.dataclass(frozen=True)
class TypicalAcceptance:
    """Medusa-2 typical acceptance (LOSSY). epsilon = posterior_threshold, alpha = sqrt(epsilon)."""

    posterior_threshold: float = 0.09
    posterior_alpha: float | None = None  # None: sqrt(posterior_threshold), as Medusa recommends

    LOSSLESS = False  # class attribute (not a field): typical acceptance is a heuristic
    SIBLING_MODES = SIBLING_MODES

    def __post_init__(self):
        if not 0.0 < self.posterior_threshold <= 1.0:
            raise ValueError(f"posterior_threshold must be in (0, 1], got {self.posterior_threshold}")
        if self.posterior_alpha is not None and self.posterior_alpha <= 0.0:
            raise ValueError(f"posterior_alpha must be > 0, got {self.posterior_alpha}")

    @property
    def alpha(self) -> float:
        a = self.posterior_alpha
        return math.sqrt(self.posterior_threshold) if a is None else a

    def thresholds(self, p: Float[Array, "... V"]) -> Float[Array, "..."]:
        """min(epsilon, alpha * exp(-H(p))): the probability a child must exceed."""
        entropy = -jnp.sum(p * jnp.log(p + 1e-5), axis=-1)
        return jnp.minimum(self.posterior_threshold, self.alpha * jnp.exp(-entropy))

    def __call__(
        self, tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
    ) -> Verdict:
        """Longest all-passing path (likelihood tie-break); next_token = argmax after it. No RNG."""
        del key
        b = target_logits.shape[0]
        p = probabilities(target_logits, sampling)  # [B, N, V]
        thr = self.thresholds(p)  # [B, N]
        parent = jnp.maximum(tree.parents, 0)
        tok = jnp.maximum(tree.tokens, 0)
        rows = jnp.arange(b)[:, None]
        p_tok = p[rows, parent, tok]  # P(token of node i | its parent)
        passes = tree.valid & (tree.tokens >= 0) & (p_tok > thr[rows, parent])
        passes = passes.at[:, 0].set(True)  # the root is already committed
        anc = ancestor_mask(tree)
        path_ok = jnp.all(~anc | passes[:, None, :], axis=-1)  # every node on the root path passes
        logp = jnp.where(passes, jnp.log(jnp.where(passes, p_tok, 1.0)), 0.0).at[:, 0].set(0.0)
        path_logp = jnp.sum(jnp.where(anc, logp[:, None, :], 0.0), axis=-1)
        depth = jnp.where(path_ok, tree.depth, -1)
        longest = path_ok & (depth == jnp.max(depth, axis=1, keepdims=True))
        best = jnp.argmax(jnp.where(longest, path_logp, -jnp.inf), axis=1)  # first on ties
        path = root_paths(tree, anc)[jnp.arange(b), best]
        next_token = jnp.argmax(target_logits[jnp.arange(b), best], axis=-1).astype(jnp.int32)
        return Verdict(path=path, n_accepted=tree.depth[jnp.arange(b), best], next_token=next_token)


typical_verify = TypicalAcceptance()  # Medusa's recommended epsilon = 0.09, alpha = 0.3
