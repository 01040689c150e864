"""The CPU kernels (packed matmul, cache attention) against XLA's ops; layout selection; fallback."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec import kernels, matmul
from specdec.attention import attend, attend_cache, cache_mask
from specdec.cache import KVCache, causal_mask
from specdec.matmul import PackedWeight, dense, pack, unpack
from specdec.models import forward, to_device

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built")
ISAS = ["", "avx2", "scalar"]  # "" = the widest this CPU runs


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- packed matmul ---------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("k,n", [(576, 960), (64, 17), (96, 40), (33, 1)])
def test_packed_matmul_equals_plain(monkeypatch, isa, k, n):
    monkeypatch.setenv("SPECDEC_CPU_ISA", isa)
    rng = np.random.default_rng(k * n)
    w = _rand(rng, k, n)
    p = pack(w)
    assert p.shape == (k, n) and p.tiles.shape == (-(-n // 16), k, 16)
    np.testing.assert_array_equal(np.asarray(unpack(p)), w)
    f = jax.jit(dense)
    for m in (1, 2, 3, 7, 13, 16, 25, 64):
        x = _rand(rng, m, k)
        y = np.asarray(f(x, p))
        np.testing.assert_allclose(y, x.astype(np.float64) @ w, rtol=1e-4, atol=1e-4 * np.sqrt(k))
        # A row's result does not depend on the other rows of the call (T-token block = T steps).
        np.testing.assert_array_equal(np.asarray(f(x[m - 1 :], p))[0], y[m - 1])


@needs_kernel
def test_many_rows_go_to_the_xla_gemm():
    """Past GEMM_ROWS rows (extraction, long prefills) a packed weight multiplies through XLA's dot on
    the unpacked weight: the same product as the plain layout, bitwise; up to it, the kernel."""
    rng = np.random.default_rng(3)
    w = _rand(rng, 64, 40)
    p = pack(w)
    x = _rand(rng, 2, matmul.GEMM_ROWS // 2 + 1, 64)  # rows counted over all leading axes
    y = np.asarray(jax.jit(dense)(x, p))
    np.testing.assert_array_equal(y, np.asarray(jax.jit(dense)(x, jnp.asarray(w))))
    assert "custom_call" not in jax.jit(dense).lower(x, p).as_text()
    assert "custom_call" in jax.jit(dense).lower(x[:, : matmul.GEMM_ROWS // 2], p).as_text()


@needs_kernel
def test_isas_agree_bitwise(monkeypatch):
    """Every ISA path runs one FMA chain per element in k order: identical results."""
    rng = np.random.default_rng(1)
    x, w = _rand(rng, 5, 200), _rand(rng, 200, 50)
    outs = []
    for isa in ISAS:
        monkeypatch.setenv("SPECDEC_CPU_ISA", isa)
        outs.append(np.asarray(jax.jit(dense)(x, pack(w))))
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


@needs_kernel
def test_packed_matmul_batch_rows_vmap_grad_and_while_loop():
    rng = np.random.default_rng(2)
    w = _rand(rng, 48, 37)
    p, x = pack(w), _rand(rng, 3, 5, 48)
    ref = x @ w
    np.testing.assert_allclose(np.asarray(jax.jit(dense)(x, p)), ref, rtol=1e-5, atol=1e-5)
    # vmap over rows folds the batch into the rows; over stacked weights, one call per weight.
    np.testing.assert_allclose(np.asarray(jax.vmap(dense, (0, None))(x, p)), ref, rtol=1e-5, atol=1e-5)
    ws = _rand(rng, 3, 48, 37)
    got = jax.jit(jax.vmap(dense))(x, pack(ws))
    np.testing.assert_allclose(np.asarray(got), np.einsum("bmk,bkn->bmn", x, ws), rtol=1e-5, atol=1e-5)
    # d/dx through the kernel (frozen weights).
    g = jax.grad(lambda a: dense(a, p).sum())(x)
    np.testing.assert_allclose(np.asarray(g), np.broadcast_to(w.sum(1), x.shape), rtol=1e-5, atol=1e-5)

    def body(i, h):
        return jnp.tanh(dense(h, pack(jnp.eye(48, dtype=jnp.float32)))) + 0 * i

    h0 = jnp.asarray(x[0])
    np.testing.assert_allclose(np.asarray(jax.jit(lambda h: jax.lax.fori_loop(0, 3, body, h))(h0)),
                               np.tanh(np.tanh(np.tanh(x[0]))), rtol=1e-6)  # fmt: skip


# ---- cache attention -------------------------------------------------------------------------


def _random_cache(cfg, rng, b: int, s: int, lengths: list[int]) -> KVCache:
    """A cache of `s` slots per row with random K and V and the given lengths."""
    cache = KVCache.init(cfg, b, s)
    kv = [jnp.asarray(_rand(rng, *cache.k.shape)) for _ in range(2)]
    return cache.replace(k=kv[0], v=kv[1], lengths=jnp.array(lengths, jnp.int32))


def _tree_block(rng, b: int, t: int):
    """The ancestor mask of a random tree of t nodes (each node's parent precedes it), [b, t, t]."""
    anc = np.eye(t, dtype=bool)
    for i in range(1, t):
        anc[i] |= anc[rng.integers(0, i)]
    return jnp.broadcast_to(jnp.asarray(anc), (b, t, t))


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)  # 16 lanes on AVX-512, 8 on AVX2 and in the portable path
@pytest.mark.parametrize("tree", [False, True])
def test_cache_attention_equals_xla(tiny_targets, monkeypatch, tree, isa):
    monkeypatch.setenv("SPECDEC_CPU_ISA", isa)
    cfg = tiny_targets["llama"].cfg
    rng = np.random.default_rng(3)
    b, s, t = 2, 40, 9
    cache = _random_cache(cfg, rng, b, s, [5, 17])
    if tree:
        block = _tree_block(rng, b, t)
    else:
        block = causal_mask(b, t)
    pos = cache.lengths[:, None] + jnp.arange(t)
    mask = cache_mask(cfg, pos, cache, block, None)
    q = jnp.asarray(_rand(rng, b, t, cfg.num_heads, cfg.head_dim))
    ref = attend_cache(q, cache, 1, mask, cfg, kernel=False)
    got = jax.jit(lambda q, c, m: attend_cache(q, c, 1, m, cfg, kernel=True))(q, cache, mask)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5, atol=2e-6)
    # Row independence: the last block row alone gives bitwise the same output.
    one = jax.jit(lambda q, c, m: attend_cache(q, c, 1, m, cfg, kernel=True))(q[:, -1:], cache, mask[:, -1:])
    np.testing.assert_array_equal(np.asarray(one)[:, 0], np.asarray(got)[:, -1])
    # A row that sees no slot gets zeros (no NaN); the XLA path averages, both are finite.
    blind = mask.at[0, 0].set(False)
    out = np.asarray(attend_cache(q, cache, 1, blind, cfg, kernel=True))
    assert np.isfinite(out).all() and not out[0, 0].any()
    np.testing.assert_allclose(out[1], np.asarray(ref)[1], rtol=2e-5, atol=2e-6)
    assert np.isfinite(np.asarray(attend(q, cache.k[1], cache.v[1], blind, cfg))).all()
    # Tokens a flattened ragged block did not compute (masked out) skip their tasks: zeros there,
    # every other row bitwise as before.
    skip = mask.at[0, 3:].set(False)
    out = np.asarray(jax.jit(lambda q, c, m: attend_cache(q, c, 1, m, cfg, kernel=True))(q, cache, skip))
    assert not out[0, 3:].any()
    np.testing.assert_array_equal(out[0, :3], np.asarray(got)[0, :3])
    np.testing.assert_array_equal(out[1], np.asarray(got)[1])


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_cache_attention_over_long_contexts_in_pieces(tiny_targets, monkeypatch, isa):
    """Past 512 slots the kernel attends in pieces merged by log-sum-exp: equal to XLA's attention,
    and still row independent, also for a block that crosses a piece boundary its root does not
    (the AR step at that length runs one piece: its bits must not change)."""
    monkeypatch.setenv("SPECDEC_CPU_ISA", isa)
    cfg = tiny_targets["llama"].cfg
    rng = np.random.default_rng(7)
    b, s, t = 2, 1800, 9
    cache = _random_cache(cfg, rng, b, s, [1500, 508])
    mask = cache_mask(cfg, cache.lengths[:, None] + jnp.arange(t), cache, _tree_block(rng, b, t), None)
    q = jnp.asarray(_rand(rng, b, t, cfg.num_heads, cfg.head_dim))
    run = jax.jit(lambda q, c, m: attend_cache(q, c, 1, m, cfg, kernel=True))
    got = np.asarray(run(q, cache, mask))
    ref = np.asarray(attend_cache(q, cache, 1, mask, cfg, kernel=False))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-6)
    for i in (0, t - 1):  # the root and the last node alone
        one = np.asarray(run(q[:, i : i + 1], cache, mask[:, i : i + 1]))
        np.testing.assert_array_equal(one[:, 0], got[:, i])
    # row 1's root alone sees 509 slots: one piece, no merge — bitwise the block's (3 pieces) result
    row = jax.tree.map(lambda x: x[:, 1:] if x.ndim == 5 else x[1:], cache)
    root = np.asarray(run(q[1:, :1], row, mask[1:, :1]))
    np.testing.assert_array_equal(root[0, 0], got[1, 0])


# ---- the model with packed params ------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "llama_tied", "mistral", "qwen2"])
def test_forward_packed_equals_plain(tiny_targets, arch):
    model = tiny_targets[arch]
    cfg = model.cfg
    plain, packed = to_device(model.params, cfg, "plain"), to_device(model.params, cfg, "packed")
    assert matmul.layout_of(plain) == "plain" and matmul.layout_of(packed) == "packed"
    assert isinstance(packed["layers"][0]["wqkv"], PackedWeight) and isinstance(
        packed["lm_head"], PackedWeight
    )
    rng = np.random.default_rng(4)
    toks = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    step = jax.jit(lambda ps, tk, pos, c, m: forward(ps, cfg, tk, pos, c, m, taps=(1,)))
    outs = {}
    for name, ps in (("plain", plain), ("packed", packed)):
        cache = KVCache.init(cfg, 2, 32)
        lg, taps, cache = step(ps, toks, jnp.arange(12)[None].repeat(2, 0), cache, causal_mask(2, 12))
        cache = cache.advance(12)
        nxt = jnp.argmax(lg[:, -1:], -1).astype(jnp.int32)
        lg2, _, _ = step(ps, nxt, cache.lengths[:, None], cache, causal_mask(2, 1))
        outs[name] = (lg, taps[0], lg2)
    for a, b in zip(outs["plain"], outs["packed"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_scan_layers_and_layer_skip_with_packed_params(tiny_targets):
    from specdec.drafters.draft_model import layer_skip

    model = tiny_targets["llama"]
    cfg = model.cfg.replace(scan_layers=True)
    ps = to_device(model.params, cfg, "packed")
    assert ps["layers"]["wqkv"].tiles.shape[0] == cfg.num_layers
    toks = jnp.asarray([[3, 4, 5, 6]], jnp.int32)
    pos = jnp.arange(4)[None]
    ref, _, _ = forward(to_device(model.params, cfg, "plain"), cfg, toks, pos, None, causal_mask(1, 4))
    got, _, _ = forward(ps, cfg, toks, pos, None, causal_mask(1, 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    drafter, dp = layer_skip(ps, cfg, 1)
    assert dp["layers"]["wqkv"].tiles.shape[0] == 1


# ---- layout selection and the fallback -------------------------------------------------------


def test_layout_selection_per_backend_and_dtype(monkeypatch):
    monkeypatch.delenv("SPECDEC_MATMUL", raising=False)
    assert matmul.choose_layout(jnp.float32, "gpu") == "plain"
    assert matmul.choose_layout(jnp.float32, "tpu") == "plain"
    assert matmul.choose_layout(jnp.bfloat16, "cpu") == "plain"
    assert matmul.choose_layout(jnp.float32, "cpu") == ("packed" if kernels.available() else "plain")
    monkeypatch.setenv("SPECDEC_MATMUL", "plain")
    assert matmul.choose_layout(jnp.float32, "cpu") == "plain"
    monkeypatch.setenv("SPECDEC_MATMUL", "packed")
    with pytest.raises(ValueError, match="CPU backend"):
        matmul.choose_layout(jnp.float32, "gpu")
    monkeypatch.setenv("SPECDEC_MATMUL", "fast")
    with pytest.raises(ValueError, match="use plain or packed"):
        matmul.choose_layout()


def test_fallback_when_the_kernel_is_absent(monkeypatch, tiny_targets, caplog):
    """No kernel: plain layout (logged once), XLA attention, the same results as forcing plain."""
    import builtins

    real_import = builtins.__import__

    def no_kernels(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "specdec" and fromlist and "_cpu_kernels" in fromlist:
            raise ImportError("simulated: no compiled kernels")
        return real_import(name, globals, locals, fromlist, level)

    monkeypatch.delenv("SPECDEC_MATMUL", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_kernels)
    kernels.isa.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="specdec"):
            assert matmul.choose_layout(jnp.float32, "cpu") == "plain"
            assert matmul.choose_layout(jnp.float32, "cpu") == "plain"
        assert sum("CPU kernels are not built" in r.getMessage() for r in caplog.records) == 1
        model = tiny_targets["llama"]
        ps = to_device(model.params, model.cfg)
        assert matmul.layout_of(ps) == "plain"
        cfg = model.cfg
        cache = KVCache.init(cfg, 1, 16)
        toks = jnp.asarray([[3, 4, 5]], jnp.int32)
        lg, _, _ = forward(ps, cfg, toks, jnp.arange(3)[None], cache, causal_mask(1, 3))
        with pytest.raises(RuntimeError, match="not built"):
            dense(jnp.ones((1, 4)), pack(jnp.ones((4, 4))))
    finally:
        monkeypatch.setattr(builtins, "__import__", real_import)
        kernels.isa.cache_clear()
        kernels.isa()  # re-register for the rest of the session
    ref, _, _ = forward(to_device(model.params, cfg, "plain"), cfg, toks, jnp.arange(3)[None], cache,
                        causal_mask(1, 3))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(lg), np.asarray(ref))
