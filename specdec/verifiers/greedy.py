"""Greedy verification (temperature 0): the longest drafted path that matches the target's argmax.

Node-wise form (SpecInfer's VerifyGreedy; Medusa/EAGLE's path-wise form gives the same result):
from the root, move to the child whose token equals the target argmax at the current node; stop at
the first node with no such child and emit that argmax. Ties are broken by `jnp.argmax` (first
maximum), exactly as the AR baseline's `sampling.sample` at temperature 0, so the output equals
greedy AR decoding token for token (in fp32; batched tree forwards can differ in low precision).

Requires nothing of the draft (any sibling mode, `draft_probs` unused) and ignores `sampling` and
`key`: it is the T = 0 verifier. Every lossless verifier reduces to this one at temperature 0.
Duplicated tokens under one prefix are followed jointly (see `walk`), so with i.i.d. drafts the
result is the longest matching root path of the whole tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from specdec.sampling import SamplingConfig, argmax
from specdec.tree import Tree, child_mask, root_paths
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.walk import first_true

LOSSLESS = True
SIBLING_MODES = ("deterministic", "without_replacement", "iid")
GREEDY_ONLY = True  # emits the target's argmax: refused at temperature > 0 (`specdec.compose`)


def greedy_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """Accept the longest argmax-matching path; next_token = target argmax after it.

    tree: any sibling mode; target_logits[b, i]: target logits after node i. Returns a Verdict with
    path[B, max_depth + 1], n_accepted[B] and next_token[B].

    The same descent as `walk.walk` (surviving equal-token candidates included) on the argmax
    tokens alone: one argmax per node up front, then integer work, no vocabulary-sized vectors in
    the loop (on CPU the generic walk cost ~1.3 ms per step, 7% of a one-token step).
    """
    del key, sampling  # greedy by definition: the emitted token is the argmax whatever the config says
    best = argmax(target_logits)  # [B, N], the AR baseline's own tie rule
    real = tree.valid & (tree.tokens >= 0)  # PAD (-1) is never a candidate, even if marked valid
    tokens = jnp.where(real, tree.tokens, 0)
    kids = child_mask(tree) & real[:, None, :]
    n = tokens.shape[1]

    def row(tok, kid, top):
        def cond(s):
            return ~s[3] & (s[2] <= tree.max_depth)

        def body(s):
            node, surv, n_acc, _ = s
            cand = jnp.any(kid & surv[:, None], axis=0)
            child = first_true(cand & (tok == top[node]))
            acc = child >= 0
            c = jnp.maximum(child, 0)
            new_surv = cand & (tok == tok[c])  # the accepted child and its equal-token fellows
            return jnp.where(acc, c, node), jnp.where(acc, new_surv, surv), n_acc + acc, ~acc

        init = (jnp.int32(0), jnp.arange(n) == 0, jnp.int32(0), jnp.bool_(False))
        node, _, n_acc, _ = jax.lax.while_loop(cond, body, init)
        return node, n_acc, top[node]

    node, n_acc, next_token = jax.vmap(row)(tokens, kids, best)
    path = jnp.take_along_axis(root_paths(tree), node[:, None, None], axis=1)[:, 0]
    return Verdict(path=path, n_accepted=n_acc, next_token=next_token)
