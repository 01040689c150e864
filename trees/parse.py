"""`parse_tree`: CLI strings -> tree builders. Every builder's `.spec` parses back to an equal builder."""

from __future__ import annotations

import ast

from specdec.trees.adaptive import AdaptiveTree
from specdec.trees.budget import BatchBudget
from specdec.trees.dynamic import DynamicTree, DySpecTree
from specdec.trees.fused import FusedTree
from specdec.trees.protocol import TreeBuilder
from specdec.trees.recursive import RSDBeamTree, RSDTree
from specdec.trees.static import NAMED_CHOICES, StaticTree, chain

TREE_FORMS = """valid tree specs:
  chain:K                        a chain of K drafted tokens (K+1 nodes)
  static:medusa63 | static:eagle1   Medusa's 63-path / EAGLE-1's 25-path static trees
  static:falcon                     a 30-node depth-6 tree for Falcon's k = 2 passes
  static:[(0,),(1,),(0,0)]       a literal list of choice paths (ranks from the root)
    (chain and static take an optional ",sample": Gumbel-top-k siblings at temperature > 0)
  dynamic:depth=5,topk=8,n=32    EAGLE-2 dynamic tree (n = nodes incl. root)
  dyspec:n=16[,topk=8][,per_call=1][,rounds=R]   DySpec greedy expansion
  rsd:2,2,1                      RSD-C: branching factor per depth, sampled without replacement
  rsd-beam:depth=4,beam=3        RSD-S: stochastic beam search
  TREE+adaptive[:h=0.3,min=1]    chain:K or dynamic:...: stop drafting a row once 1 - prod(acceptance)
                                 > h (SpecDec++; trees/adaptive.py), e.g. chain:8+adaptive; h defaults
                                 to the drafter's measured threshold, min = depths always drafted
  TREE+budget:M                  any tree per row, at most M drafts verified over the whole batch
                                 (the most confident; trees/budget.py), e.g. chain:4+budget:8
  TREE+fused[:paths=R,len=L,topk=K,theta=T]   TREE with a fused drafter's retrieval candidates
                                 merged in (R paths of up to L tokens: R*L extra nodes; candidates
                                 whose first token is outside the model's top-K at the root and
                                 below probability T are pruned; trees/fused.py). A fused drafter
                                 (--drafter eagle+ngram) adds it to any tree by itself"""


def _fail(spec: str, why: str) -> ValueError:
    return ValueError(f"bad tree spec {spec!r}: {why}\n{TREE_FORMS}")


def _int(spec: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _fail(spec, f"{text!r} is not an integer") from None


def _kwargs(spec: str, body: str, names: dict[str, str]) -> dict[str, int]:
    """Parse `a=1,b=2` into {field: int}; `names` maps accepted keys to dataclass fields."""
    out: dict[str, int] = {}
    for item in filter(None, body.split(",")):
        k, eq, v = item.partition("=")
        if not eq or k.strip() not in names:
            raise _fail(spec, f"unknown or malformed option {item!r} (expected {', '.join(names)})")
        out[names[k.strip()]] = _int(spec, v.strip())
    return out


def _modify(spec: str, builder: TreeBuilder, mod: str) -> TreeBuilder:
    """Apply one `+MOD` (adaptive[:opts], fused[:opts] or budget:M) to `builder`."""
    kind, colon, body = mod.partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "adaptive":
            opts: dict[str, float | int] = {}
            for item in filter(None, body.split(",")):
                k, eq, v = (x.strip() for x in item.partition("="))
                if not eq or k not in ("h", "min"):
                    raise _fail(spec, f"unknown or malformed adaptive option {item!r} (expected h=, min=)")
                try:
                    opts["threshold" if k == "h" else "min_length"] = float(v) if k == "h" else int(v)
                except ValueError:
                    raise _fail(spec, f"{item!r}: not a number") from None
            return AdaptiveTree(builder, **opts)
        if kind == "budget" and colon:
            return BatchBudget(builder, _int(spec, body.strip()))
        if kind == "fused":
            opts = {}
            for item in filter(None, body.split(",")):
                k, eq, v = (x.strip() for x in item.partition("="))
                names = {"paths": "paths", "len": "length", "topk": "topk", "theta": "theta"}
                if not eq or k not in names:
                    raise _fail(spec, f"unknown or malformed fused option {item!r} ({', '.join(names)})")
                try:
                    opts[names[k]] = float(v) if k == "theta" else int(v)
                except ValueError:
                    raise _fail(spec, f"{item!r}: not a number") from None
            return FusedTree(builder, **opts)
    except ValueError as e:
        raise e if str(e).startswith("bad tree spec") else _fail(spec, str(e)) from None
    raise _fail(spec, f"expected +adaptive[:h=H,min=M], +fused[:...] or +budget:M after '+', got {mod!r}")


def parse_tree(spec: str) -> TreeBuilder:
    """Build the tree builder a CLI string names (forms in `TREE_FORMS`); ValueError otherwise."""
    base, *mods = spec.split("+")
    if mods:
        builder = parse_tree(base)
        for mod in mods:
            builder = _modify(spec, builder, mod.strip())
        return builder
    kind, colon, body = spec.strip().partition(":")
    kind, body = kind.strip().lower(), body.strip()
    if not colon or not body:
        raise _fail(spec, "expected KIND:ARGS")
    try:
        if kind in ("chain", "static"):
            sample = body.endswith(",sample")
            body = body.removesuffix(",sample").strip()
            if kind == "chain":
                return chain(_int(spec, body), sample=sample)
            if body in NAMED_CHOICES:
                return StaticTree(NAMED_CHOICES[body], sample=sample)
            if not body.startswith(("[", "(")):
                raise _fail(spec, f"unknown static tree {body!r} (named: {', '.join(NAMED_CHOICES)})")
            try:
                choices = ast.literal_eval(body)
            except (ValueError, SyntaxError):
                raise _fail(spec, "the choice list is not a Python literal") from None
            if not isinstance(choices, (list, tuple)) or not all(
                isinstance(c, (list, tuple)) for c in choices
            ):
                raise _fail(spec, "choices must be a list of tuples of ranks")
            return StaticTree(tuple(tuple(c) for c in choices), sample=sample)
        if kind == "dynamic":
            return DynamicTree(**_kwargs(spec, body, {"depth": "depth", "topk": "topk", "n": "num_nodes"}))
        if kind == "dyspec":
            names = {"n": "num_nodes", "topk": "topk", "per_call": "per_call", "rounds": "rounds"}
            return DySpecTree(**_kwargs(spec, body, names))
        if kind == "rsd":
            return RSDTree(tuple(_int(spec, x.strip()) for x in body.split(",")))
        if kind == "rsd-beam":
            return RSDBeamTree(**_kwargs(spec, body, {"depth": "depth", "beam": "beam"}))
    except ValueError as e:
        if str(e).startswith("bad tree spec"):
            raise
        raise _fail(spec, str(e)) from None
    raise _fail(spec, f"unknown kind {kind!r}")
