"""Greedy verification (temperature 0): the longest drafted path that matches the target's argmax.

Node-wise form (SpecInfer's VerifyGreedy; Medusa/EAGLE's path-wise form gives the same result):
from the root, move to the child whose token equals the target argmax at the current node; stop at
the first node with no such child and emit that argmax. Ties are broken by `jnp.argmax` (first
maximum), exactly as the AR baseline's `sampling.sample` at temperature 0, so the output equals
greedy AR decoding token for token (in fp32; batched tree forwards can differ in low precision).

Requires nothing of the draft (any sibling mode, `draft_probs` unused) and ignores `sampling` and
`key`: it is the T = 0 verifier. Every lossless verifier reduces to this one at temperature 0.
Duplicated tokens under one prefix are followed jointly (see `_walk`), so with i.i.d. drafts the
result is the longest matching root path of the whole tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers._walk import NodeView, first_true, walk
from specdec.verifiers.protocol import Verdict

LOSSLESS = True
SIBLING_MODES = ("deterministic", "without_replacement", "iid")
_GREEDY = SamplingConfig()  # temperature 0: the walk emits the argmax of the one-hot residual


def _greedy_node(view: NodeView):
    best = jnp.argmax(view.logits)  # same tie rule as the AR baseline
    child = first_true(view.cand & (view.tokens == best))
    return child, jax.nn.one_hot(best, view.logits.shape[0], dtype=jnp.float32)


def greedy_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """Accept the longest argmax-matching path; next_token = target argmax after it.

    tree: any sibling mode; target_logits[b, i]: target logits after node i. Returns a Verdict with
    path[B, max_depth + 1], n_accepted[B] and next_token[B].
    """
    del sampling  # greedy by definition: the emitted token is the argmax whatever the config says
    return walk(tree, target_logits, key, _GREEDY, _greedy_node)
