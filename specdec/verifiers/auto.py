"""`auto`: the lossless verifier that fits the tree, chosen at trace time.

temperature 0 -> greedy; deterministic siblings (top-k, lookup) -> target_only (q one-hot);
a chain of sampled drafts -> block verification (its accepted length stochastically dominates token
verification's; MT-Bench at T = 1 with the shipped EAGLE on `chain:4,sample`: tau 1.63 vs 1.56,
docs/verifiers.md); other sampled siblings, without replacement or i.i.d. -> recursive rejection
sampling (rrs skips duplicate i.i.d. siblings). The default verifier of `specdec.generate`.
"""

from __future__ import annotations

from jaxtyping import Array, Float, PRNGKeyArray

from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.verifiers.block import block_verify
from specdec.verifiers.greedy import greedy_verify
from specdec.verifiers.protocol import Verdict
from specdec.verifiers.rrs import rrs_verify
from specdec.verifiers.target_only import target_only_verify

LOSSLESS = True
SIBLING_MODES = ("deterministic", "without_replacement", "iid")


def auto_verify(
    tree: Tree, target_logits: Float[Array, "B N V"], key: PRNGKeyArray, sampling: SamplingConfig
) -> Verdict:
    """Dispatch on `sampling` and `tree.sibling_mode` (both static); see the module docstring."""
    if sampling.greedy:
        return greedy_verify(tree, target_logits, key, sampling)
    if tree.sibling_mode == "deterministic":
        return target_only_verify(tree, target_logits, key, sampling)
    if tree.num_nodes == tree.max_depth + 1:  # one node per depth: a chain
        return block_verify(tree, target_logits, key, sampling)
    return rrs_verify(tree, target_logits, key, sampling)
