"""Drafter fusion: a model drafter plus retrieval sources, drafted into one tree (RASD).

`Fused(model, sources)` is a drafter that drafts with `model` (any drafter: EAGLE, Medusa, a
draft model, n-gram lookup) and carries retrieval sources whose candidate continuations a fusing
tree builder (`specdec.trees.fused.FusedTree`) merges into the model's tree. It delegates
`begin` / `expand` and the optional members (`max_depth`, `acceptance`, `threshold`, `fallback`)
to the model, so any builder drafts the model's tree through it, and it keeps the model's raw
logits at the root (`root_logits`), from which the fusing builder prunes candidates by the model's
probabilities (RASD's pruning).

A retrieval source has the members

    retrieval: tuple[int, int]                 (paths R, length L) of what `retrieve` returns
    retrieve(params, ctx) -> (tokens [B, R, L], ok [B, R, L])
                                               candidate continuations of ctx's root, best first;
                                               ok is prefix-closed (a path is ok[r, :n])

and keeps no state of its own (n-gram lookup: `specdec.drafters.ngram.NGram`; a datastore:
`specdec.drafters.rest.Rest`). The sources are asked once per step, when the context changes
(`init`, `update`), and their candidates kept in the state: `should_draft` and the fusing
builder read them there. Fused params are `(model_params, (source_params, ...))`, fused state a
`FusedState`.

`update` passes the verification's taps to the model, so a feature-level drafter (EAGLE, Medusa)
reads the target's features at every accepted node, retrieval nodes included (its `update` takes
them along the accepted path); token-level drafters catch up from the committed context.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from specdec import drafter as drafter_contract
from specdec.context import Context
from specdec.tree import Tree


@flax.struct.dataclass
class FusedState:
    model: Any
    tokens: Int[Array, "B R L"]  # every source's candidates for the current root (`retrieve`)
    ok: Bool[Array, "B R L"]
    root_logits: Float[Array, "B V"]  # the model's raw logits at this step's root (set by `begin`)


def is_source(obj) -> bool:
    """Whether `obj` can serve as a retrieval source (module doc)."""
    return callable(getattr(obj, "retrieve", None)) and getattr(obj, "retrieval", None) is not None


@dataclasses.dataclass(frozen=True)
class Fused:
    """`model`'s drafts plus the candidates of `sources`, fused by `specdec.trees.fused`."""

    model: Any
    sources: tuple

    def __post_init__(self):
        if not self.sources:
            raise ValueError("a fused drafter needs at least one retrieval source")
        for s in self.sources:
            if not is_source(s):
                raise ValueError(f"{type(s).__name__} is not a retrieval source (no retrieve/retrieval)")

    # ------------------------------------------------------------------------------- what it declares
    @property
    def taps(self) -> tuple[int, ...]:
        return tuple(self.model.taps)

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def fused(self) -> tuple[int, int]:
        """(R, L) of `retrieve`: all sources' candidate paths together, padded to the longest
        length (`specdec.drafter`: a fusing builder declares the same pair as `fuses`)."""
        return sum(s.retrieval[0] for s in self.sources), max(s.retrieval[1] for s in self.sources)

    @property
    def max_depth(self):
        return drafter_contract.option(self.model, "max_depth")

    @property
    def adaptive(self) -> bool:
        return bool(drafter_contract.option(self.model, "adaptive"))

    @property
    def fallback(self):
        return drafter_contract.option(self.model, "fallback")

    @property
    def acceptance(self):
        inner = drafter_contract.option(self.model, "acceptance")
        if inner is None:
            return None
        return lambda params, state, *a: inner(params[0], state.model, *a)

    @property
    def threshold(self):
        return drafter_contract.option(self.model, "threshold")

    # ------------------------------------------------------------------------------------- the hooks
    def init(self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int) -> FusedState:
        model = self.model.init(params[0], ctx, prompt, prefill_taps, cache_size, window=window)
        b = ctx.lengths.shape[0]
        return FusedState(model, *self._candidates(params, ctx), jnp.zeros((b, self.vocab_size), jnp.float32))

    def should_draft(self, params, state: FusedState, ctx: Context) -> Bool[Array, " B"]:
        """Rows the model wants to draft for, or that have a retrieval candidate."""
        return self.model.should_draft(params[0], state.model, ctx) | jnp.any(state.ok[:, :, 0], axis=1)

    def begin(self, params, state: FusedState, ctx: Context):
        logits, model = self.model.begin(params[0], state.model, ctx)
        return logits, state.replace(model=model, root_logits=logits.astype(jnp.float32))

    def expand(self, params, state: FusedState, ctx: Context, tree: Tree, frontier: Int[Array, "B F"]):
        logits, model = self.model.expand(params[0], state.model, ctx, tree, frontier)
        return logits, state.replace(model=model)

    def update(self, params, state: FusedState, ctx: Context, tree: Tree, verdict, taps) -> FusedState:
        model = self.model.update(params[0], state.model, ctx, tree, verdict, taps)
        tokens, ok = self._candidates(params, ctx)  # one lookup per step, on the new context
        return state.replace(model=model, tokens=tokens, ok=ok)

    def retrieve(self, params, state: FusedState, ctx: Context):
        """This step's candidates of every source (tokens [B, R, L], ok [B, R, L])."""
        return state.tokens, state.ok

    def _candidates(self, params, ctx: Context):
        """Every source's candidates, concatenated; a shorter source's paths are padded with
        not-ok positions."""
        _, length = self.fused
        toks, oks = [], []
        for s, p in zip(self.sources, params[1], strict=True):
            t, ok = s.retrieve(p, ctx)
            pad = ((0, 0), (0, 0), (0, length - t.shape[2]))
            toks.append(jnp.pad(t, pad))
            oks.append(jnp.pad(ok, pad))
        return jnp.concatenate(toks, axis=1), jnp.concatenate(oks, axis=1)
