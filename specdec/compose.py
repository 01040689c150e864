"""`make_spec`: validate a drafter x tree builder x verifier composition before anything compiles.

A composition that cannot work is refused here with a one-line `CompositionError` naming the
problem and the fix, instead of compiling into a decode that degrades without a word:

  * a drafter or builder that lacks a member of its contract (`specdec.drafter`, `specdec.builder`);
  * a drafter whose vocabulary is not the target's;
  * a tree deeper than the drafter drafts (Medusa's heads, DFlash's block, n-gram's proposal);
  * a fused drafter (retrieval sources) with a tree that does not fuse its candidates, or the
    other way round (`specdec.trees.fused`);
  * a verifier that cannot take the tree's sibling mode (SpecInfer and SpecTr need i.i.d. siblings);
  * the greedy verifier at temperature > 0 (it emits the target's argmax: not the target's sampling);
  * a chain-only verifier (block verification) with a tree that has siblings;
  * params grouped for another mesh.

Cache sizing for the attention kind (flash needs a tiling size) is the host driver's
(`specdec.generate`), which knows the prompt and output lengths.
"""

from __future__ import annotations

import functools
import logging

from specdec import builder as builder_contract
from specdec import drafter as drafter_contract
from specdec import sharding
from specdec.decode import Spec
from specdec.models.config import ModelConfig
from specdec.sampling import SamplingConfig


class CompositionError(ValueError):
    """A drafter / tree builder / verifier combination that cannot work; the message names the fix."""


def _name(obj) -> str:
    return getattr(obj, "spec", None) or getattr(obj, "__name__", None) or type(obj).__name__


def make_spec(
    cfg: ModelConfig, sampling: SamplingConfig, drafter=None, builder=None, verifier=None, mesh=None, *,
    check: bool = False, trace: bool = False,
) -> Spec:  # fmt: skip
    """The validated, hashable recipe of a decode (see the module doc for what is refused)."""
    if mesh is not None and cfg.tp_groups != sharding.model_size(mesh):
        raise sharding.MeshError(
            f"the params are grouped for a model axis of {cfg.tp_groups} but the mesh's is "
            f"{sharding.model_size(mesh)}; build them with specdec.sharding.shard_params on this mesh"
        )
    if drafter is None:
        if builder is not None or verifier is not None:
            raise CompositionError("a tree builder or verifier needs a drafter (drafter=None is AR decoding)")
        return Spec(cfg, sampling, mesh=mesh, check=check, trace=trace)
    if builder is None:
        raise CompositionError(
            "speculative decoding needs a tree builder (e.g. specdec.trees.parse_tree('chain:4'))"
        )
    if verifier is None:
        from specdec.verifiers.auto import auto_verify as verifier
    contracts = (
        ("drafter", drafter, drafter_contract.missing(drafter), "specdec.drafter"),
        ("tree builder", builder, builder_contract.missing(builder), "specdec.builder"),
    )
    for what, obj, lacks, doc in contracts:
        if lacks:
            raise CompositionError(
                f"the {what} {type(obj).__name__} lacks {', '.join(lacks)}; implement the contract in {doc}"
            )
    if drafter.vocab_size != cfg.vocab_size:
        raise CompositionError(
            f"drafter vocabulary ({drafter.vocab_size}) differs from the target's ({cfg.vocab_size}); a "
            "drafter must share the target's tokenizer (or map its reduced vocabulary onto the target's)"
        )
    limit = drafter_contract.option(drafter, "max_depth")
    depth = builder_contract.option(builder, "model_depth") or builder.max_depth
    if limit is not None and depth > limit:
        raise CompositionError(
            f"the tree {_name(builder)} is {depth} deep but {type(drafter).__name__} drafts at "
            f"most {limit} depths; use a tree of depth <= {limit} (e.g. chain:{limit})"
        )
    fused, fuses = drafter_contract.option(drafter, "fused"), builder_contract.option(builder, "fuses")
    if fused != fuses:
        raise CompositionError(
            f"the drafter carries retrieval candidates of (paths, length) {fused} but the tree "
            f"{_name(builder)} fuses {fuses}; build the tree with specdec.trees.fused.fit(builder, drafter) "
            "(the CLIs do), or use a drafter without retrieval sources"
        )
    _check_verifier(sampling, builder, verifier)
    fallback = drafter_contract.option(drafter, "fallback")
    if fallback:
        _say(fallback)
    return Spec(cfg, sampling, drafter, builder, verifier, mesh, check=check, trace=trace)


@functools.cache
def _say(note: str) -> None:
    """A drafter's declared fallback, named once in the log (`specdec.drafter`: `fallback`)."""
    logging.getLogger("specdec").info("specdec: %s", note)


def _check_verifier(sampling: SamplingConfig, builder, verifier) -> None:
    from specdec.verifiers import requirements

    modes, greedy_only, chain_only = requirements(verifier)
    if chain_only and builder.num_nodes != builder.max_depth + 1:  # N = depth + 1 nodes: a chain
        raise CompositionError(
            f"the verifier {_name(verifier)} verifies one drafted chain, but the tree {_name(builder)} "
            f"has {builder.num_nodes} nodes over {builder.max_depth} depths; use chain:K or chain:K,sample"
        )
    if greedy_only and not sampling.greedy:
        raise CompositionError(
            f"the verifier {_name(verifier)} is the temperature-0 verifier (it emits the target's argmax); "
            f"at temperature {sampling.temperature} use --verifier auto (or speculative, rrs)"
        )
    draw = builder_contract.option(builder, "sibling_mode")
    mode = None if draw is None else draw(sampling)
    if modes is not None and mode is not None and mode not in modes:
        raise CompositionError(
            f"the verifier {_name(verifier)} needs {' or '.join(modes)} siblings, but the tree "
            f"{_name(builder)} draws {mode} ones at temperature {sampling.temperature}; use --verifier auto "
            "(which fits any tree) or a tree whose siblings it can verify"
        )
