"""Tree builders: static, dynamic and recursive-sampling trees; the contract is `specdec.builder`.

from specdec.trees import parse_tree
builder = parse_tree("dynamic:depth=5,topk=8,n=32")
tree, draft_state = builder(drafter, params, draft_state, ctx, key, sampling)
check_tree(tree, vocab_size)   # the structural invariants every builder keeps (specdec.invariants)
"""

from specdec.invariants import check_tree
from specdec.trees.budget import BatchBudget
from specdec.trees.dynamic import DynamicTree, DySpecTree
from specdec.trees.fused import FusedTree, fit
from specdec.trees.parse import TREE_FORMS, parse_tree
from specdec.trees.protocol import TreeBuilder
from specdec.trees.recursive import RSDBeamTree, RSDTree
from specdec.trees.static import EAGLE1_25, MEDUSA_63, NAMED_CHOICES, StaticTree, chain

__all__ = [
    "EAGLE1_25",
    "BatchBudget",
    "MEDUSA_63",
    "NAMED_CHOICES",
    "TREE_FORMS",
    "DySpecTree",
    "DynamicTree",
    "FusedTree",
    "RSDBeamTree",
    "RSDTree",
    "StaticTree",
    "TreeBuilder",
    "chain",
    "check_tree",
    "fit",
    "parse_tree",
]
