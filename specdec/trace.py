"""Structured step traces: every step's tree and verdict, recorded on device, written as JSON lines.

`generate(..., trace=PATH)` records, for each step and each row that was running at it, the tree
the target verified (valid nodes as `[index, token, parent]`), the accepted path (node indices
from the root), the tokens the step appended, and the row's cache length before and after the
commit. The records live in the decode state (`StepRecords`, preallocated for `max_new_tokens`
steps, which bounds the steps of any decode), so the fused `lax.while_loop` and the host loop
(`loop="python"`) record the same things, and a trace holds no timings: the same decode gives the
same bytes from either loop. One JSON object per line, keys in a fixed order:

    {"step": 0, "row": 0, "nodes": [[0, 42, -1], [1, 7, 0]], "path": [0, 1], "accepted": [7, 9],
     "cache_before": 17, "cache_after": 19}
"""

from __future__ import annotations

import json
import os

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from specdec.tree import Tree
from specdec.verifiers.protocol import Verdict


@flax.struct.dataclass
class StepRecords:
    tokens: Int[Array, "S B N"]
    parents: Int[Array, "S B N"]
    valid: Bool[Array, "S B N"]
    path: Int[Array, "S B D1"]
    n_accepted: Int[Array, "S B"]
    new: Int[Array, "S B D1"]  # tokens appended, the first `count` of them
    count: Int[Array, "S B"]
    running: Bool[Array, "S B"]
    cache_before: Int[Array, "S B"]
    cache_after: Int[Array, "S B"]

    @classmethod
    def empty(cls, steps: int, batch: int, num_nodes: int, max_depth: int) -> StepRecords:
        i = lambda *s: jnp.zeros((steps, batch) + s, jnp.int32)  # noqa: E731
        b = lambda *s: jnp.zeros((steps, batch) + s, bool)  # noqa: E731
        return cls(tokens=i(num_nodes), parents=i(num_nodes), valid=b(num_nodes), path=i(max_depth + 1),
                   n_accepted=i(), new=i(max_depth + 1), count=i(), running=b(), cache_before=i(),
                   cache_after=i())  # fmt: skip


def _pad(x: Array, size: int, fill) -> Array:
    """Pad axis 1 of `x` to `size` (an AR step's one-node tree in a tree-sized record)."""
    return jnp.pad(x, ((0, 0), (0, size - x.shape[1])) + ((0, 0),) * (x.ndim - 2), constant_values=fill)


def record(
    records: StepRecords, step: Int[Array, ""], tree: Tree, verdict: Verdict, new: Int[Array, "B K"],
    count: Int[Array, " B"], running: Bool[Array, " B"], cache_before: Int[Array, " B"],
    cache_after: Int[Array, " B"],
) -> StepRecords:  # fmt: skip
    """`records` with step `step` written (steps past the preallocated ones are dropped)."""
    n, d1 = records.tokens.shape[2], records.path.shape[2]
    row = dict(
        tokens=_pad(tree.tokens, n, 0), parents=_pad(tree.parents, n, -1), valid=_pad(tree.valid, n, False),
        path=_pad(verdict.path, d1, 0), n_accepted=verdict.n_accepted, new=_pad(new, d1, 0), count=count,
        running=running, cache_before=cache_before, cache_after=cache_after,
    )  # fmt: skip
    return records.replace(
        **{
            k: getattr(records, k).at[step].set(v.astype(getattr(records, k).dtype), mode="drop")
            for k, v in row.items()
        }  # fmt: skip
    )


def lines(records: StepRecords, steps: int, rows: int) -> list[str]:
    """The JSON lines of the first `steps` steps for rows `0..rows-1` (rows running at the step)."""
    r = jax.tree.map(np.asarray, records)
    out = []
    for s in range(min(steps, r.tokens.shape[0])):
        for b in range(rows):
            if not r.running[s, b]:
                continue
            nodes = [[int(i), int(r.tokens[s, b, i]), int(r.parents[s, b, i])]
                     for i in np.flatnonzero(r.valid[s, b])]  # fmt: skip
            item = {
                "step": s, "row": b, "nodes": nodes,
                "path": r.path[s, b, : int(r.n_accepted[s, b]) + 1].tolist(),
                "accepted": r.new[s, b, : int(r.count[s, b])].tolist(),
                "cache_before": int(r.cache_before[s, b]), "cache_after": int(r.cache_after[s, b]),
            }  # fmt: skip
            out.append(json.dumps(item, separators=(", ", ": ")))
    return out


def write(path: str | os.PathLike, records: StepRecords, steps: int, rows: int) -> None:
    """Write the trace's JSON lines to `path` (replacing it)."""
    with open(path, "w") as f:
        f.writelines(line + "\n" for line in lines(records, steps, rows))
