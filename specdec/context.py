"""`Context`: the committed history a drafter and a tree builder read at every step."""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


@flax.struct.dataclass
class Context:
    """Row b's committed tokens are `tokens[b, :lengths[b]]`; the last one is the root, the newest
    token, whose KV is not yet in the target cache (it is node 0 of this step's tree). `running`
    (set by the loop for the tree builder, None elsewhere) marks the rows still decoding: a builder
    may stop drafting for the others, whose trees are never used."""

    tokens: Int[Array, "B S"]  # prompt + generated tokens; tokens[b, lengths[b] - 1] is the root
    lengths: Int[Array, " B"]  # committed tokens including the root
    running: Bool[Array, " B"] | None = None

    @property
    def running_rows(self) -> Bool[Array, " B"]:
        """`running`, or every row when the loop did not say."""
        return jnp.ones(self.lengths.shape, bool) if self.running is None else self.running

    @property
    def root(self) -> Int[Array, " B"]:
        return jnp.take_along_axis(self.tokens, (self.lengths - 1)[:, None], axis=1)[:, 0]
