"""The verifier protocol and its result, the Verdict.

A verifier is any function

    verify(tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray,
           sampling: SamplingConfig) -> Verdict

where `target_logits[:, i]` are the target's raw next-token logits after node i (the verifier
applies `sampling` itself, with `specdec.sampling.probabilities`, exactly as the target's AR
sampling would). It walks down from the root, accepts a path of drafted nodes and emits one more
token: the bonus token (sampled from the target at the last accepted node) or the correction
(sampled from the residual distribution after the last rejection). It must be jit-compatible and
static-shaped, and treat invalid nodes (`tree.valid == False`) as absent.

Lossless verifiers (everything here except `typical`) guarantee that emitted tokens are
distributed exactly as AR sampling from the target (argmax at temperature 0).
"""

from __future__ import annotations

from typing import Protocol

import flax.struct
from jaxtyping import Array, Float, Int, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import Tree


@flax.struct.dataclass
class Verdict:
    path: Int[Array, "B D1"]  # accepted node indices from the root (path[:, 0] = 0); 0 past n_accepted
    n_accepted: Int[Array, " B"]  # drafted tokens accepted (root excluded): 0..max_depth
    next_token: Int[Array, " B"]  # bonus or corrected token; becomes the next root


class Verifier(Protocol):
    def __call__(
        self, tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
    ) -> Verdict: ...
