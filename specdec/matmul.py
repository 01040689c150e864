"""The dense projection `x @ w` of every model and drafter, with a packed weight layout for CPU.

XLA:CPU runs a matmul of one row as a memory-bound GEMV but a matmul of 2-16 rows as a general GEMM
that re-packs the weight on every call, so a speculative verification block of T tokens cost 2-4x
a one-token step. Here weights are packed once, when params go to the device (`pack_params`), as
column tiles `[ceil(N/16), K, 16]`, and a small C++ kernel (`specdec/kernels/packed_matmul.cc`, an
XLA FFI custom call, AVX-512 or AVX2) streams each weight once per call whatever the row count.

Layouts (chosen per backend, a property of the device params; drafters, builders and verifiers
never see it): `"packed"` on CPU when the kernel is built, `"plain"` otherwise (GPU/TPU, where
XLA's own matmuls are memory-bound-efficient, non-f32 weights, or no kernel: then specdec says so
once in the log). `SPECDEC_MATMUL=plain|packed` overrides the automatic choice.

Numerics: each output element of the packed kernel is one FMA chain over k in order, so a row's
result does not depend on the other rows of the call (a T-token block gives each row exactly the
logits a one-token step would); it differs from XLA's dot by f32 rounding only.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from specdec import kernels

TILE = 16
# The weight names that are dense [K, N] projections, in target and drafter params alike.
DENSE_KEYS = frozenset({"wqkv", "wo", "w_gate_up", "w_down", "lm_head", "fc_w", "head"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedWeight:
    """A `[K, N]` weight as column tiles `tiles [..., ceil(N/16), K, 16]` (zero padded past N).

    Leading axes (stacked layers under `lax.scan`) are sliced like any array; `n` is static.
    """

    tiles: Float[Array, "... NB K 16"]
    n: int = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the plain weight this packs, `[..., K, N]`."""
        return self.tiles.shape[:-3] + (self.tiles.shape[-2], self.n)

    @property
    def dtype(self):
        return self.tiles.dtype


def pack(w: Float[Array, "... K N"]) -> PackedWeight:
    """Column tiles of `w` (host or device array; leading axes kept)."""
    w = jnp.asarray(w, jnp.float32)
    *lead, k, n = w.shape
    nb = -(-n // TILE)
    w = jnp.pad(w, [(0, 0)] * len(lead) + [(0, 0), (0, nb * TILE - n)])
    tiles = jnp.swapaxes(w.reshape(*lead, k, nb, TILE), -3, -2)
    return PackedWeight(tiles, n)


def unpack(p: PackedWeight) -> Float[Array, "... K N"]:
    """The plain `[..., K, N]` weight back from its tiles."""
    *lead, nb, k, _ = p.tiles.shape
    return jnp.swapaxes(p.tiles, -3, -2).reshape(*lead, k, nb * TILE)[..., : p.n]


def plain(w: Array | PackedWeight) -> Array:
    """`w` in the plain layout, whichever layout it has."""
    return unpack(w) if isinstance(w, PackedWeight) else w


# ---- the kernel -------------------------------------------------------------------------------


def _call(x2: Float[Array, "M K"], p: PackedWeight) -> Float[Array, "M N"]:
    if not kernels.available():  # registers the custom call on first use
        raise RuntimeError(
            "a PackedWeight needs specdec's CPU kernels, which are not built: use the "
            "plain layout (to_device(..., layout='plain'))"
        )
    out = jax.ShapeDtypeStruct((x2.shape[0], p.n), jnp.float32)
    call = jax.ffi.ffi_call(kernels.PACKED_MATMUL, out)
    return call(x2, p.tiles, isa=np.int64(kernels.isa_cap()), threads=np.int64(0))


@functools.cache
def _packed_2d(n: int):
    """`x2 [M, K] @ tiles -> [M, n]` for one output width, with its vmap rule (n is static)."""

    @jax.custom_batching.custom_vmap
    def mm(x2: Float[Array, "M K"], tiles: Float[Array, "NB K 16"]):
        return _call(x2, PackedWeight(tiles, n))

    @mm.def_vmap
    def _(axis_size, in_batched, x2, tiles):
        x_b, w_b = in_batched
        if w_b:  # a batch of weights: one call per weight
            x2 = x2 if x_b else jnp.broadcast_to(x2, (axis_size,) + x2.shape)
            return jax.lax.map(lambda a: mm(a[0], a[1]), (x2, tiles)), True
        if not x_b:
            return mm(x2, tiles), False
        # Batched rows against one weight: fold the batch into the rows, one pass over the weight.
        b, m, k = x2.shape
        return mm(x2.reshape(b * m, k), tiles).reshape(b, m, -1), True

    return mm


def _packed_dense(x: Float[Array, "... K"], p: PackedWeight) -> Float[Array, "... N"]:
    y = _packed_2d(p.n)(x.reshape(-1, x.shape[-1]).astype(jnp.float32), p.tiles)
    return y.reshape(*x.shape[:-1], p.n)


@jax.custom_vjp
def _dense_packed_vjp(x, p):
    return _packed_dense(x, p)


def _fwd(x, p):
    return _packed_dense(x, p), p


def _bwd(p, g):
    # Packed weights are frozen inference params: d/dx only (d/dw is zero by construction).
    dx = jnp.einsum("...n,kn->...k", g, unpack(p))
    return dx, jax.tree.map(jnp.zeros_like, p)


_dense_packed_vjp.defvjp(_fwd, _bwd)


# Above this many rows a call is compute-bound and XLA's GEMM (which re-packs the weight once per
# call) beats the kernel: measured on one Zen 4 core, kernel/XLA time 0.6-1.0 up to 128 rows, 1.2-1.6
# at 256-512 and 1.6-1.8 at 2048 (576x1536 and 576x49152 weights). Up to it, so for every decode and
# verification block of batch <= 16 x 64 nodes, the kernel's row independence holds.
GEMM_ROWS = 1024


def dense(x: Float[Array, "... K"], w: Float[Array, "K N"] | PackedWeight) -> Float[Array, "... N"]:
    """`x @ w` in float32 for a plain `[K, N]` weight or a `PackedWeight` (the CPU kernel; calls of
    more than `GEMM_ROWS` rows, feature extraction and long prefills, go to XLA's GEMM instead)."""
    if isinstance(w, PackedWeight):
        if math.prod(x.shape[:-1]) > GEMM_ROWS:
            return jnp.dot(x, unpack(w), preferred_element_type=jnp.float32)
        return _dense_packed_vjp(x, w)
    if jnp.dtype(w.dtype).itemsize < jnp.dtype(x.dtype).itemsize:
        x = x.astype(w.dtype)  # low-precision weights: the product in theirs, accumulated in f32
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


# ---- layout selection -------------------------------------------------------------------------


def choose_layout(dtype: Any = jnp.float32, backend: str | None = None) -> str:
    """`"packed"` on a CPU backend with the kernel built and f32 weights, else `"plain"`."""
    forced = os.environ.get("SPECDEC_MATMUL", "")
    if forced not in ("", "plain", "packed"):
        raise ValueError(f"SPECDEC_MATMUL={forced!r}: use plain or packed (or leave it unset)")
    if forced == "plain":
        return "plain"
    backend = backend or jax.default_backend()
    if backend != "cpu" or jnp.dtype(dtype) != jnp.float32:
        if forced == "packed":
            raise ValueError("SPECDEC_MATMUL=packed needs the CPU backend and float32 weights")
        if backend == "cpu":
            _say_non_f32_on_cpu(jnp.dtype(dtype).name)
        return "plain"
    if not kernels.available():
        if forced == "packed":
            raise ValueError("SPECDEC_MATMUL=packed but the CPU kernel is not built; reinstall specdec")
        return "plain"
    return "packed"


@functools.cache
def _say_non_f32_on_cpu(dtype: str) -> None:
    """The fallback a non-f32 model takes on CPU, named once per dtype: the kernels are f32 only, so
    its matmuls and its (same-dtype) KV cache attention run as XLA's ops."""
    kernels.log.warning(
        "specdec: %s weights and KV cache on CPU: using XLA's matmul and attention, not specdec's "
        "float32 CPU kernels (verification blocks cost more; without avx512_bf16 XLA widens bf16 to f32 "
        "around every product). --dtype float32 is the fast path on CPU.", dtype,
    )  # fmt: skip


def pack_params(tree: Any, layout: str) -> Any:
    """Pack every dense projection (`DENSE_KEYS`, float32, ≥ 2-D) of a params tree for `layout`."""
    if layout == "plain":
        return tree
    if layout != "packed":
        raise ValueError(f"unknown matmul layout {layout!r}: use plain or packed")

    return map_dense(tree, _pack_leaf)


def map_dense(tree: Any, fn: Any) -> Any:
    """`tree` with `fn` applied to every dense projection (`DENSE_KEYS` leaves), the rest as is."""
    if isinstance(tree, dict):
        return {k: (fn(v) if k in DENSE_KEYS else map_dense(v, fn)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(map_dense(v, fn) for v in tree)
    return tree


def cast_dense(tree: Any, dtype: Any) -> Any:
    """Every dense projection of a params tree as a plain `dtype` matrix; a tied model gets an
    `lm_head` (the embedding transposed) and keeps its f32 embedding for the lookup. So only the
    products run in `dtype` (`dense` casts x to the weight's dtype, accumulates in f32): residual
    stream, norms, attention and softmax stay f32.

    bfloat16 runs a 4x512 SmolLM2-135M forward 1.6x faster than float32 on a Zen 4 core (top-1
    agrees at ~99% of positions, taps within ~0.4%): feature extraction's option
    (`specdec-train --extract_dtype`, docs/training.md), never the decode path.
    """
    dtype = jnp.dtype(dtype)

    def leaf(v):
        v = unpack(v) if isinstance(v, PackedWeight) else v
        return v.astype(dtype) if getattr(v, "ndim", 0) >= 2 else v

    out = map_dense(tree, leaf)
    if isinstance(out, dict) and "embed" in out and "lm_head" not in out:
        out["lm_head"] = jnp.asarray(out["embed"]).T.astype(dtype)
    return out


def native_bf16() -> bool:
    """Whether bf16 products pay here: any accelerator, or a CPU with bf16 dot-product instructions
    (`avx512_bf16` / `amx_bf16`). Without them XLA widens bf16 to f32 around every product: on a
    Zen 3 core (AVX2) a 4x512 SmolLM2-135M forward ran 1.35x *slower* in bf16 (173 vs 129 tok/s).
    """
    if jax.default_backend() != "cpu":
        return True
    try:
        flags = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no way to tell, keep f32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _pack_leaf(v):
    if isinstance(v, PackedWeight) or getattr(v, "ndim", 0) < 2 or jnp.dtype(v.dtype) != jnp.float32:
        return v
    return pack(v)


def layout_of(tree: Any) -> str:
    """`"packed"` when any leaf of `tree` is a `PackedWeight`, else `"plain"`."""
    leaves = jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, PackedWeight))
    return "packed" if any(isinstance(x, PackedWeight) for x in leaves) else "plain"
