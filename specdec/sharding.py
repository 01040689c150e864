"""Decoding on a device mesh: tensor-parallel target weights and KV cache, data-parallel rows.

A mesh has the axes (`data`, `model`); an unsharded run is the 1×1 mesh (or no mesh at all).
JAX is the distributed engine: params and the decode state carry `NamedSharding`s, the whole
prefill and `lax.while_loop` are jitted as before, and XLA's sharding propagation places
everything in between (tree block, verifier, commit, drafter state) and inserts the collectives.

Layout with G = the `model` axis size (Megatron-style tensor parallelism):

| tensor | shape | sharding |
|---|---|---|
| `embed` | [V, D] | vocabulary on `model` (replicated if G does not divide V) |
| `lm_head` | [D, V] | vocabulary on `model` (the logits stay vocab-sharded into the verifier) |
| `wqkv`, `bqkv` | [D, (Hq + 2 Hkv) Dh] | columns on `model`, regrouped so a shard holds whole heads |
| `wo` | [Hq Dh, D] | rows on `model` (one all-reduce per layer) |
| `w_gate_up` | [D, 2 I] | columns on `model`, regrouped so a shard holds matching gate/up columns |
| `w_down` | [I, D] | rows on `model` (one all-reduce per layer) |
| norms | [D] | replicated |
| KV cache | [L, B, S, Hkv, Dh] | rows on `data`, KV heads on `model` |
| tokens, lengths, … | [B, …] | rows on `data` |
| drafter KV caches | [L, B, S, H, Dh] | rows on `data`, replicated over `model` |

The fused projections are regrouped on the host (`cfg.tp_groups = G`, see
`specdec.models.decoder.split_qkv`): the checkpoint's [q | k | v] columns become G groups
[q | k | v of shard g]. KV heads that G does not divide are repeated when they divide G (each
shard keeps the one KV head its query heads read — what vLLM does when TP exceeds the KV heads):
an equivalent model with G KV heads. A mesh that fits neither is refused with a message naming
the model's sizes. Sharded weights use the plain matmul layout: the CPU packed-matmul and
cache-attention kernels are single-device custom calls.

Multi-host: call `jax.distributed.initialize()` in every process first; `parse_mesh` then lays the
mesh over `jax.devices()`, which spans all hosts (docs/sharding.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from specdec.cache import KVCache
from specdec.models.config import ModelConfig

AXES = ("data", "model")


class MeshError(ValueError):
    """A mesh that this machine's devices or the model's shapes cannot take."""


def parse_mesh(spec: str | None, devices=None) -> Mesh | None:
    """`"data=2,model=4"` (either axis may be omitted: 1) → a Mesh over the first 8 devices.

    None or "" gives None (unsharded). Raises MeshError on bad syntax or too few devices."""
    if not spec:
        return None
    sizes = {"data": 1, "model": 1}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise MeshError(f"mesh {spec!r}: expected data=N,model=M with N, M >= 1 (e.g. data=2,model=4)")
        sizes[name] = int(value)
    return make_mesh(sizes["data"], sizes["model"], devices)


def make_mesh(data: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (`data`, `model`) mesh over the first data × model of `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    n = data * model
    if n > len(devices):
        raise MeshError(
            f"mesh data={data},model={model} needs {n} devices but {len(devices)} are visible; use a "
            f"smaller mesh (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={n} simulates {n})"
        )
    return Mesh(np.asarray(devices[:n]).reshape(data, model), AXES)


def model_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["model"]


def data_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape["data"]


def tp_config(cfg: ModelConfig, g: int) -> tuple[ModelConfig, int]:
    """The config of `cfg` split G ways and the KV-head repeat factor, or MeshError naming the fix."""
    if g == 1:
        return cfg, 1
    problems = [f"{name}={n}" for name, n in (("num_heads", cfg.num_heads),
                ("intermediate_size", cfg.intermediate_size)) if n % g]  # fmt: skip
    nkv = cfg.num_kv_heads
    if nkv % g and g % nkv:
        problems.append(f"num_kv_heads={nkv} (neither divides the other)")
    if problems:
        sizes = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0
                 and cfg.intermediate_size % d == 0 and (nkv % d == 0 or d % nkv == 0)]  # fmt: skip
        raise MeshError(
            f"a model axis of {g} does not divide the model's {', '.join(problems)}; "
            f"use model= one of {sizes}"
        )
    rep = 1 if nkv % g == 0 else g // nkv
    return cfg.replace(num_kv_heads=nkv * rep, tp_groups=g), rep


def regroup_tensor(key: str, x: np.ndarray, cfg: ModelConfig, g: int, rep: int) -> np.ndarray:
    """One host param in the checkpoint layout → the G-group layout of `cfg.tp_groups = G`.

    `wqkv`/`bqkv` [..., (Hq + 2 Hkv) Dh] → G × [q_g | k_g | v_g] with the KV heads repeated `rep`
    times; `w_gate_up` [..., 2 I] → G × [gate_g | up_g]; any other param is returned as is."""
    if g == 1 and rep == 1 or key not in ("wqkv", "bqkv", "w_gate_up"):
        return x
    if key == "w_gate_up":
        parts = [a.reshape(a.shape[:-1] + (g, -1)) for a in np.split(x, 2, axis=-1)]
        return np.concatenate(parts, axis=-1).reshape(x.shape)
    nq, nkv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = np.split(x, [nq * dh, (nq + nkv) * dh], axis=-1)
    heads = lambda y, n: y.reshape(y.shape[:-1] + (n, dh))  # noqa: E731
    q, k, v = heads(q, nq), np.repeat(heads(k, nkv), rep, axis=-2), np.repeat(heads(v, nkv), rep, axis=-2)
    parts = [a.reshape(a.shape[:-2] + (g, -1)) for a in (q, k, v)]
    return np.concatenate(parts, axis=-1).reshape(x.shape[:-1] + (-1,))


def regroup(params: dict, cfg: ModelConfig, g: int, rep: int) -> dict:
    """`regroup_tensor` over a whole host params tree (layers unrolled or stacked)."""
    layer = lambda lp: {k: regroup_tensor(k, np.asarray(v), cfg, g, rep) for k, v in lp.items()}  # noqa: E731
    layers = params["layers"]
    layers = [layer(lp) for lp in layers] if isinstance(layers, (list, tuple)) else layer(layers)
    return {**params, "layers": layers}


def _spec(name: str, ndim: int, cfg: ModelConfig, g: int) -> P:
    """The partition of one param by its name (trailing axes; a stacked-layer axis stays None)."""
    col, row = P(*([None] * (ndim - 1)), "model"), P(*([None] * (ndim - 2)), "model", None)
    if name in ("wqkv", "bqkv", "w_gate_up"):
        return col
    if name in ("wo", "w_down"):
        return row
    if name in ("embed", "lm_head") and cfg.vocab_size % g == 0:
        return row if name == "embed" else col
    return P()


def tensor_placer(mesh: Mesh, dtype: str = "float32"):
    """`put(key, host_array, checkpoint_cfg) -> sharded device array`, for `_build_params`' stream:
    regroup, cast and place one param (only its shards reach each device)."""
    g = model_size(mesh)

    def put(key: str, x: np.ndarray, cfg: ModelConfig) -> jax.Array:
        tcfg, rep = tp_config(cfg, g)
        x = regroup_tensor(key, np.asarray(x), cfg, g, rep).astype(jnp.dtype(dtype), copy=False)
        return place(x, NamedSharding(mesh, _spec(key, x.ndim, tcfg, g)))

    return put


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh) -> tuple[dict, ModelConfig]:
    """Host params (`specdec.loading`, checkpoint layout) → device params sharded over `mesh`.

    Returns the params and the config they run with (`tp_groups` = the model axis, KV heads
    repeated where needed). Casts to `cfg.dtype` and stacks layers for `cfg.scan_layers`, like
    `specdec.models.to_device`, in the plain matmul layout. Params already on `mesh` (from
    `load_model(..., mesh=mesh)`, which streams them there) are kept as they are."""
    tcfg, _ = tp_config(cfg, model_size(mesh))
    if on_mesh(params.get("embed"), mesh):
        return stack_layers(params, tcfg), tcfg
    put = tensor_placer(mesh, cfg.dtype)
    out = {k: put(k, v, cfg) for k, v in params.items() if k != "layers"}
    layers = params["layers"]
    if isinstance(layers, dict):
        out["layers"] = {k: put(k, v, cfg) for k, v in layers.items()}
    else:
        out["layers"] = [{k: put(k, v, cfg) for k, v in lp.items()} for lp in layers]
    return stack_layers(out, tcfg), tcfg


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Unrolled device layers → one dict stacked on a leading L axis when `cfg.scan_layers`."""
    layers = params["layers"]
    if not cfg.scan_layers or isinstance(layers, dict):
        return params
    return {**params, "layers": {k: jnp.stack([lp[k] for lp in layers]) for k in layers[0]}}


def on_mesh(x: Any, mesh: Mesh) -> bool:
    """`x` is a jax array laid out on `mesh`."""
    return isinstance(getattr(x, "sharding", None), NamedSharding) and x.sharding.mesh == mesh


def device_params(params: dict, cfg: ModelConfig, mesh: Mesh | None = None) -> tuple[dict, ModelConfig]:
    """Host params → (device params, config): `to_device` without a mesh, `shard_params` with one."""
    if mesh is None:
        from specdec.models import to_device

        return to_device(params, cfg), cfg
    return shard_params(params, cfg, mesh)


def place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value every process holds: each local device gets a copy of only
    its slice (so it also works when the mesh spans several processes, where `device_put` of the
    whole would not), never an alias of `x`, so a streamed load holds one tensor on the host at a
    time."""

    def put(idx, d):
        y = jax.device_put(x[idx], d, may_alias=False)
        # The CPU runtime may still adopt an aligned host buffer as the device buffer (jax 0.10,
        # measured: `x` stays referenced for as long as `y` lives); a copy on the device frees it.
        return jnp.copy(y) if d.platform == "cpu" else y

    shards = [put(idx, d) for d, idx in sharding.addressable_devices_indices_map(x.shape).items()]
    # Wait for the copies: an asynchronous transfer keeps `x` alive as well.
    jax.block_until_ready(shards)
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def fetch(x: jax.Array) -> np.ndarray:
    """The whole value of a global array on the host, in every process (gathered when multi-host)."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Drafter params on `mesh`: leaves already laid out on it (a layer-skip drafter's share of the
    sharded target) stay as they are, every other array is replicated on all its devices."""
    rep = NamedSharding(mesh, P())

    def one(x):
        return x if not hasattr(x, "shape") or on_mesh(x, mesh) else place(np.asarray(x), rep)

    return jax.tree.map(one, tree)


def rows(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis on `data`, the rest replicated."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV cache [L, B, S, Hkv, Dh]: rows on `data`, KV heads on `model`."""
    return NamedSharding(mesh, P(None, "data", None, "model", None))


def constrain_state(state, mesh: Mesh | None):
    """Pin the decode state to the mesh layout (inside jit): the target cache (rows on `data`, KV
    heads on `model`), the per-row arrays, and every KV cache inside the drafter's state (rows on
    `data`, replicated over `model`: a draft stack is small). The drafter's other arrays follow
    propagation (their layout comes from the taps and tokens they are computed from)."""
    if mesh is None:
        return state
    wsc = jax.lax.with_sharding_constraint
    draft_kv = NamedSharding(mesh, P(None, "data", None, None, None))

    def pin(c: KVCache, kv: NamedSharding) -> KVCache:
        return c.replace(k=wsc(c.k, kv), v=wsc(c.v, kv), lengths=wsc(c.lengths, rows(mesh, 1)))

    per_row = {f: wsc(getattr(state, f), rows(mesh, getattr(state, f).ndim))
               for f in ("tokens", "length", "prompt_lens", "done", "row_steps")}  # fmt: skip
    is_cache = lambda x: isinstance(x, KVCache)  # noqa: E731
    draft = jax.tree.map(lambda x: pin(x, draft_kv) if is_cache(x) else x, state.draft, is_leaf=is_cache)
    return state.replace(cache=pin(state.cache, cache_sharding(mesh)), draft=draft, **per_row)
