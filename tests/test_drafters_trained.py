"""Trained-drafter families (Medusa, EAGLE-1/2, EAGLE-3, DFlash) in the loop: shapes, lossless
greedy output with chain, static and dynamic builders, the EAGLE and DFlash draft caches equal to a
full recomputation, DFlash's anchored-block training mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import causal_mask
from specdec.decode import Spec, prefill_jit, step_jit
from specdec.drafters import amphista, dflash, eagle, falcon, medusa
from specdec.drafters import checkpoint as ckpt
from specdec.drafters.fused import Fused
from specdec.drafters.ngram import NGram
from specdec.drafters.protocol import Context
from specdec.generate import CompositionError, generate, pad_prompts
from specdec.models import forward, to_device
from specdec.sampling import SamplingConfig
from specdec.tree import Tree
from specdec.trees import fit, parse_tree
from specdec.verifiers import get_verifier

pytest.importorskip("torch")
PROMPTS = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13], list(range(20, 45))]
TREES = ["chain:3", "static:eagle1", "dynamic:depth=3,topk=3,n=10"]


@pytest.fixture(scope="module")
def target(tiny_models):
    _, loaded = tiny_models["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    return params, cfg, generate(params, cfg, PROMPTS, max_new_tokens=16).tokens


def make(kind: str, params, cfg, d2t=None):
    key = jax.random.PRNGKey(3)
    vd = None if d2t is None else len(d2t)
    head = ckpt.target_head(params)
    if kind == "medusa":
        c = medusa.MedusaConfig.for_target(cfg, 5, vd)
        p = medusa.init_params(c, key)
        p["w"] = jax.random.normal(key, p["w"].shape) * 0.1  # not the identity-like init
        d = medusa.Medusa(c)
        fam = "medusa"
    elif kind.startswith("amphista"):
        own = kind == "amphista_own"
        c = amphista.AmphistaConfig.for_target(cfg, 5, vd, own_heads=own)
        h = head if d2t is None else head[:, np.asarray(d2t)]
        p = amphista.init_params(c, key, h if own else None)
        p["heads_w"] = jax.random.normal(key, p["heads_w"].shape) * 0.1
        d, fam = amphista.Amphista(c), "amphista"
    elif kind == "falcon":
        c = falcon.FalconConfig.for_target(cfg, 1, vd, k=2)
        p = eagle.init_params(c, key)
        d, fam = falcon.Falcon(c), "falcon"
    elif kind == "dflash":
        c = dflash.DFlashConfig.for_target(cfg, num_layers=2, block_size=6, draft_vocab_size=vd, taps=(1, 2))
        p = dflash.init_params(c, key)
        d, fam = dflash.DFlash(c), "dflash"
    else:
        c = eagle.EagleConfig.for_target(cfg, 1 if kind == "eagle" else 3, vd)
        h = None if d2t is None else head[:, np.asarray(d2t)]
        p = eagle.init_params(c, key, h if kind == "eagle3" else None)
        d = eagle.Eagle(c)
        fam = "eagle"
    if d2t is not None:
        p["d2t"] = np.asarray(d2t, np.int32)
    return d, ckpt.bind(fam, c, p, params)


KINDS = ["medusa", "amphista", "eagle", "eagle3", "falcon", "dflash"]


def decode_states(params, cfg, d, dp, builder, steps: int = 4):
    """The greedy decode state right after prefill, then after each of `steps - 1` loop steps."""
    spec = Spec(cfg=cfg, sampling=SamplingConfig(), drafter=d, builder=builder, verifier=get_verifier("auto"))
    prompt, lens, size = pad_prompts(PROMPTS, cfg, 40, window=16)
    eos = jnp.asarray([-1], jnp.int32)
    state = prefill_jit(params, dp, jnp.asarray(prompt), jnp.asarray(lens), jax.random.PRNGKey(0), eos, 40,
                        spec=spec, cache_size=size)  # fmt: skip
    for step in range(steps):
        if step:
            state = step_jit(params, dp, state, eos, 40, spec=spec)
        yield state


# adaptive lengths on every family, fused with prompt lookup's candidates (`eagle+ngram`): a chain
# or a dynamic tree each, checked every step
ADAPTIVE = [
    ("medusa", "chain:4+adaptive:h=0.9"),
    ("amphista", "dynamic:depth=3,topk=3,n=10+adaptive:h=0.7"),
    ("eagle", "dynamic:depth=3,topk=3,n=10+adaptive:h=0.7"),
    ("eagle3", "chain:4+adaptive:h=0.9"),
    ("falcon", "dynamic:depth=4,topk=2,n=8+adaptive:h=0.7"),
    ("dflash", "chain:5+adaptive:h=0.9"),
]


# the plain chain / dynamic tree where the family's adaptive case does not already draft that shape
COVERED = {("medusa", "chain:3"), ("eagle3", "chain:3"), ("amphista", TREES[2]), ("eagle", TREES[2]),
           ("falcon", TREES[2])}  # fmt: skip


@pytest.mark.parametrize(
    "kind,tree",
    [(k, t) for k in KINDS for t in TREES if (k, t) not in COVERED]
    + [("falcon", "static:falcon"), ("dflash", "chain:5"), *ADAPTIVE],
)
def test_greedy_equals_ar(target, kind, tree):
    """Greedy = AR for every family and builder; the static tree runs the two other lossless
    verifiers (RRS, target-only), one per family, the rest the default (Amphista with its own
    heads there); the adaptive trees run fused with prompt lookup (feature drafters then take the
    target's taps at accepted retrieval nodes)."""
    params, cfg, ar = target
    builder = parse_tree(tree)
    reduced = kind == "eagle3" or (kind in ("dflash", "amphista") and tree == "chain:3")
    d2t = np.arange(0, cfg.vocab_size, 2) if reduced else None  # a reduced draft vocabulary
    own = kind == "amphista" and tree == "static:eagle1"
    d, dp = make("amphista_own" if own else kind, params, cfg, d2t)
    adaptive = "+adaptive" in tree
    if adaptive:  # fused: the family's adaptive tree with retrieval paths merged in
        d, dp = Fused(d, (NGram(cfg.vocab_size, max_depth=5, paths=2),)), (dp, (None,))
        builder = fit(builder, d)
    verifier = None
    if tree == "static:eagle1":
        verifier = get_verifier("rrs" if KINDS.index(kind) % 2 else "target_only")
    out = generate(params, cfg, PROMPTS, max_new_tokens=16, drafter=d, draft_params=dp, builder=builder,
                   check=adaptive, verifier=verifier)  # fmt: skip
    assert out.tokens == ar
    if adaptive:  # the stop rule ran: fewer drafter calls than the full tree's depth every step
        assert out.draft_calls < builder.model_depth * out.steps


def test_dflash_shorter_inference_block_equals_ar(target):
    """`DFlash.with_block`: fewer mask positions per forward; output = AR; blocks outside
    2..trained are refused, and so is a tree deeper than the block drafts (block - 1)."""
    params, cfg, ar = target
    builder = parse_tree("dynamic:depth=2,topk=3,n=6")
    d, dp = make("dflash", params, cfg)
    short = d.with_block(3)
    assert (short.cfg.block_size, d.cfg.block_size, short.max_depth) == (3, 6, 2)
    out = generate(params, cfg, PROMPTS, max_new_tokens=16, drafter=short, draft_params=dp, builder=builder)
    assert out.tokens == ar
    for bad in (1, 7):
        with pytest.raises(ValueError, match=r"2\.\.6"):
            d.with_block(bad)
    with pytest.raises(CompositionError, match="at most 2 depths; use a tree of depth <= 2"):
        generate(params, cfg, PROMPTS, max_new_tokens=4, drafter=short, draft_params=dp,
                 builder=parse_tree("chain:3"))  # fmt: skip


@pytest.mark.parametrize("confidence", [0.02, 0.9])
def test_confidence_gated_eagle_equals_ar(target, confidence):
    """`confidence`: some steps draft, others are plain AR steps (lax.cond); output unchanged."""
    import dataclasses

    params, cfg, ar = target
    builder = parse_tree("chain:3")
    d, dp = make("eagle", params, cfg)
    d = dataclasses.replace(d, confidence=confidence)
    out = generate(params, cfg, PROMPTS, max_new_tokens=16, drafter=d, draft_params=dp, builder=builder)
    assert out.tokens == ar


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_eagle_cache_equals_full_recompute(target, kind):
    """After prefill and several steps, the draft's root output equals running the draft layer
    over the whole committed sequence at once with the target's teacher-forced features."""
    params, cfg, _ = target
    builder = parse_tree("dynamic:depth=3,topk=3,n=10")
    d, dp = make(kind, params, cfg)

    @jax.jit
    def recompute(seq):  # [1, N] -> the draft layer's outputs [1, N - 1, D]; causal, so padding is inert
        n = seq.shape[1]
        pos = jnp.arange(n)[None]
        _, taps, _ = forward(params, cfg, seq, pos, None, causal_mask(1, n), taps=d.taps)
        feat = eagle.fuse(dp, d.cfg, taps)[:, : n - 1]
        out, _ = eagle.run_layer(dp, d.cfg, seq[:, 1:], feat, pos[:, 1:], None, causal_mask(1, n - 1))
        return out

    for state in decode_states(params, cfg, d, dp, builder):
        toks, length = np.asarray(state.tokens), np.asarray(state.length)
        for b in range(len(PROMPTS)):
            n = int(length[b])  # committed tokens incl. the root at n - 1
            out = recompute(jnp.asarray(toks[b : b + 1]))
            np.testing.assert_allclose(state.draft.out[b, 0], out[0, n - 2], atol=2e-4, rtol=1e-4)
            assert int(state.draft.cache.lengths[b]) == n - 2


def test_medusa_feature_is_the_one_before_the_root(target):
    params, cfg, _ = target
    d, dp = make("medusa", params, cfg)
    spec = Spec(cfg=cfg, sampling=SamplingConfig(), drafter=d, builder=parse_tree("chain:3"),
                verifier=get_verifier("auto"))  # fmt: skip
    prompt, lens, size = pad_prompts(PROMPTS, cfg, 40, window=16)
    eos = jnp.asarray([-1], jnp.int32)
    state = prefill_jit(params, dp, jnp.asarray(prompt), jnp.asarray(lens), jax.random.PRNGKey(0), eos, 40,
                        spec=spec, cache_size=size)  # fmt: skip
    state = step_jit(params, dp, state, eos, 40, spec=spec)
    for b in range(len(PROMPTS)):
        n = int(state.length[b])
        seq = jnp.asarray(np.asarray(state.tokens)[b : b + 1, : n - 1])
        _, taps, _ = forward(
            params, cfg, seq, jnp.arange(n - 1)[None], None, causal_mask(1, n - 1), taps=d.taps
        )
        want = medusa.head_logits(dp, d.cfg, taps[0][0, -1])
        np.testing.assert_allclose(state.draft.logits[b], want, atol=2e-4, rtol=1e-4)


def test_dflash_cache_equals_full_recompute(target):
    """After prefill and several steps, the block anchored at the root (drafted from the cached
    context K/V) equals the no-cache training forward over the committed sequence with the target's
    teacher-forced taps, anchor = the root."""
    params, cfg, _ = target
    builder = parse_tree("dynamic:depth=3,topk=3,n=10")
    d, dp = make("dflash", params, cfg)

    @jax.jit
    def recompute(seq, anchor):  # [1, N], [1, 1] -> block logits [1, 1, K, Vd]
        n = seq.shape[1]
        _, taps, _ = forward(params, cfg, seq, jnp.arange(n)[None], None, causal_mask(1, n), taps=d.taps)
        return dflash.draft_logits(dp, d.cfg, dflash.train_forward(dp, d.cfg, seq, taps, anchor))

    for state in decode_states(params, cfg, d, dp, builder):
        toks, length = np.asarray(state.tokens), np.asarray(state.length)
        logits, _, _ = jax.jit(d.block)(dp, state.draft.cache, jnp.asarray(toks[np.arange(3), length - 1]))
        for b in range(len(PROMPTS)):
            n = int(length[b])  # committed tokens incl. the root at n - 1
            assert int(state.draft.cache.lengths[b]) == n - 1
            want = recompute(jnp.asarray(toks[b : b + 1]), jnp.asarray([[n - 1]]))
            np.testing.assert_allclose(logits[b], want[0, 0], atol=2e-4, rtol=1e-4)


def test_dflash_training_mask():
    """A query sees context strictly before its anchor and its own block, never another block."""
    m = np.asarray(dflash.training_mask(jnp.asarray([[2, 5]]), 8, 3))[0]  # [A*K = 6, T + A*K = 14]
    assert m.shape == (6, 14)
    np.testing.assert_array_equal(m[:3, :8], np.tile(np.arange(8) < 2, (3, 1)))  # block 0: anchor at 2
    np.testing.assert_array_equal(m[3:, :8], np.tile(np.arange(8) < 5, (3, 1)))
    own = np.zeros((6, 6), bool)
    own[:3, :3] = own[3:, 3:] = True  # bidirectional inside a block
    np.testing.assert_array_equal(m[:, 8:], own)


def test_dflash_anchored_attention_equals_dense_mask(target):
    """The split training attention (context before the anchor and the own block apart, merged by
    log-sum-exp) = dense attention under `training_mask`, outputs and gradients; control: anchors
    moved by one give other outputs (the outputs compared depend on the anchors)."""
    params, cfg, _ = target
    d, dp = make("dflash", params, cfg)
    seq = jax.random.randint(jax.random.PRNGKey(5), (2, 20), 0, cfg.vocab_size)
    _, taps, _ = forward(params, cfg, seq, jnp.arange(20)[None].repeat(2, 0), None, causal_mask(2, 20),
                         taps=d.taps)  # fmt: skip
    anchors = jnp.asarray([[3, 9, 14], [1, 7, 12]])

    def total(p, split, a=anchors):
        out = dflash.train_forward(p, d.cfg, seq, taps, a, split=split)
        return jnp.sum(jnp.sin(out)), out

    (_, dense), g_dense = jax.value_and_grad(total, has_aux=True)(dp, False)
    (_, split), g_split = jax.value_and_grad(total, has_aux=True)(dp, True)
    np.testing.assert_allclose(split, dense, atol=1e-4, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(g_split), jax.tree.leaves(g_dense), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-3)
    _, moved = total(dp, True, anchors + 1)
    assert not np.allclose(moved, split, atol=1e-3)


def test_amphista_cache_equals_full_recompute(target):
    """After prefill and several steps, the heads' logits equal the no-cache adaptation stages over
    the whole committed sequence (pairs (h_t, x_{t+1}), the target's teacher-forced h) at P - 1."""
    params, cfg, _ = target
    builder = parse_tree("static:eagle1")
    d, dp = make("amphista", params, cfg)

    @jax.jit
    def recompute(seq):  # [1, N] -> head logits at every position [1, N, K, Vd]
        n = seq.shape[1]
        pos = jnp.arange(n)[None]
        _, taps, _ = forward(params, cfg, seq, pos, None, causal_mask(1, n), taps=d.taps)
        nxt = jnp.concatenate([seq[:, 1:], seq[:, :1]], axis=1)
        a, _ = amphista.adapt(dp, d.cfg, taps[0], nxt, pos, None, causal_mask(1, n))
        return amphista.head_logits(dp, d.cfg, a)

    for state in decode_states(params, cfg, d, dp, builder):
        toks, length = np.asarray(state.tokens), np.asarray(state.length)
        for b in range(len(PROMPTS)):
            n = int(length[b])  # committed tokens incl. the root at n - 1
            assert int(state.draft.cache.lengths[b]) == n - 1
            want = recompute(jnp.asarray(toks[b : b + 1]))[0, n - 2]
            np.testing.assert_allclose(state.draft.logits[b], want, atol=2e-4, rtol=1e-4)


def test_amphista_auto_embedding_is_bidirectional_across_heads_only(target):
    """Every head's output depends on every head's input (no causal mask across heads), and a
    position's heads never see another position's."""
    params, cfg, _ = target
    d, dp = make("amphista", params, cfg)
    k = d.cfg.num_draft_heads
    hk = jax.random.normal(jax.random.PRNGKey(5), (2, k, cfg.hidden_size))
    jac = jax.jacobian(lambda x: amphista.auto_embedding(dp, d.cfg, x))(hk)  # [2, K, D, 2, K, D]
    dep = np.abs(np.asarray(jac)).sum(axis=(2, 5))  # [n, k, n', j]
    for n in range(2):
        assert (dep[n, :, n, :] > 0).all()  # head k sees head j, both ways
        assert (dep[n, :, 1 - n, :] == 0).all()  # positions are independent


def test_falcon_passes_equal_the_training_forward(target):
    """In the loop, Falcon's passes (the one anchored at the root over committed pairs, then one
    anchored at a depth-2 chain node over drafted pairs) equal `sar_forward` over the same pairs
    with the relaxed block-causal mask, i.e. what training computes."""
    params, cfg, _ = target
    d, dp = make("falcon", params, cfg)
    toks = jnp.asarray([[5, 9, 3, 5, 9, 3, 7, 11, 4, 6, 8, 10]])
    r = 8  # the prompt is toks[:r], the root toks[r]
    _, taps, _ = forward(params, cfg, toks[:, : r + 1], jnp.arange(r + 1)[None], None, causal_mask(1, r + 1),
                         taps=d.taps)  # fmt: skip
    ctx = Context(
        tokens=jnp.zeros((1, 64), jnp.int32).at[:, : toks.shape[1]].set(toks), lengths=jnp.asarray([r + 1])
    )
    state = d.init(dp, ctx, toks[:, :r], tuple(t[:, :r] for t in taps), 64, window=8)
    _, state = d.begin(dp, state, ctx)
    # training view: pairs for positions 1..r (feature f_{p-1}, token t_p), blocks ending at the root
    f = taps[0][:, :r]
    pos = jnp.arange(1, r + 1)[None]
    out = falcon.sar_forward(dp, d.cfg, toks[:, 1 : r + 1], f, pos, falcon.block_mask(r, 2, r % 2)[None])
    np.testing.assert_allclose(state.out[0, 0], out[0, r - 2], atol=1e-4, rtol=1e-4)  # f̂_r from pair r - 1
    np.testing.assert_allclose(state.pending[0, 0], out[0, r - 1], atol=1e-4, rtol=1e-4)  # f̂_{r+1}
    tree = Tree.chain(toks[:, r : r + 3])  # root + depths 1, 2 (tokens t_{r+1}, t_{r+2})
    for node in (1, 2):
        _, state = d.expand(dp, state, ctx, tree, jnp.asarray([[node]]))
    # the depth-2 pass: pairs (f̂_r, t_{r+1}), (f̂_{r+1}, t_{r+2}) after the committed ones
    f2 = jnp.concatenate([f, state.out[:, :1], state.pending[:, :1]], axis=1)
    pos2 = jnp.arange(1, r + 3)[None]
    out2 = falcon.sar_forward(
        dp, d.cfg, toks[:, 1 : r + 3], f2, pos2, falcon.block_mask(r + 2, 2, r % 2)[None]
    )
    np.testing.assert_allclose(state.out[0, 2], out2[0, r], atol=1e-4, rtol=1e-4)  # f̂_{r+2}
    np.testing.assert_allclose(state.pending[0, 2], out2[0, r + 1], atol=1e-4, rtol=1e-4)  # f̂_{r+3}


def test_falcon_block_mask_and_glancing():
    """Relaxed block-causal mask: a pair sees its own k-block and earlier ones. CSGD's glancing
    input keeps round(λ·d) positions of truth in whole blocks, drafted pairs elsewhere."""
    m = np.asarray(falcon.block_mask(6, 2))
    want = np.array([[j // 2 <= i // 2 for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(m, want)
    assert m[0, 1] and not m[1, 2]  # sees the rest of its block, not the next block
    np.testing.assert_array_equal(
        np.asarray(falcon.block_mask(5, 2, 1))[0], [True, False, False, False, False]
    )
    true_tok = jnp.arange(12).reshape(1, 12)
    pred_tok = true_tok.at[:, 2:].add(100)  # 10 mismatches among the valid positions 2..11
    true_f, pred_f = jnp.zeros((1, 12, 3)), jnp.ones((1, 12, 3))
    valid = jnp.arange(12)[None] >= 2
    tok, feat, rev = falcon.glance(jax.random.PRNGKey(0), true_tok, true_f, pred_tok, pred_f, valid, 0.4, 2)
    rev = np.asarray(rev[0])
    assert rev[:2].all()  # invalid positions keep the truth
    assert rev[2:].sum() == 4  # round(0.4 * 10) = 4 positions = 2 whole blocks
    assert all(rev[i] == rev[i + 1] for i in range(0, 12, 2))  # aligned blocks
    np.testing.assert_array_equal(
        np.asarray(tok[0]), np.where(rev, np.arange(12), np.arange(12) + 100 * (np.arange(12) >= 2))
    )
    np.testing.assert_array_equal(np.asarray(feat[0, :, 0]), np.where(rev, 0.0, 1.0))


def test_dflash_warm_start_copies_the_target(tiny_models):
    """`--dflash_init target`: draft layers = the target's last layers, and the fused context feature
    = the deepest tap under the first copied layer's attention norm (so draft layer 0's context
    K/V are that target layer's own); more draft layers than the target has is a clear error."""
    from specdec.models.llama import rms_norm

    _, loaded = tiny_models["llama"]
    cfg, n_layers = loaded.cfg, loaded.cfg.num_layers
    layers = [dict(lp) for lp in loaded.params["layers"]]
    layers[-1]["attn_norm"] = np.random.default_rng(0).uniform(0.5, 1.5, cfg.hidden_size).astype(np.float32)
    host = {**loaded.params, "layers": layers}
    c = dflash.DFlashConfig.for_target(cfg, num_layers=1, block_size=4, taps=(0, n_layers - 1))
    dp = dflash.init_from_target(c, jax.random.key(0), host)
    np.testing.assert_array_equal(dp["layers"]["0"]["input_norm"], layers[-1]["attn_norm"])
    np.testing.assert_array_equal(dp["layers"]["0"]["w_down"], layers[-1]["w_down"])
    seq = jnp.asarray([PROMPTS[2]])
    t = seq.shape[1]
    _, taps, _ = forward(to_device(host, cfg), cfg, seq, jnp.arange(t)[None], None, causal_mask(1, t),
                         taps=c.taps)  # fmt: skip
    want = rms_norm(taps[1], layers[-1]["attn_norm"], cfg.rms_norm_eps)  # the last layer's normed input
    np.testing.assert_allclose(dflash.context_features(dp, c, taps), want, atol=1e-5)
    cold = dflash.context_features(dflash.init_params(c, jax.random.key(0)), c, taps)
    assert np.abs(np.asarray(cold - want)).max() > 0.1  # negative control: a random fc does not
    with pytest.raises(ValueError, match="--dflash_init random"):
        too_deep = dflash.DFlashConfig.for_target(cfg, num_layers=n_layers + 1)
        dflash.init_from_target(too_deep, jax.random.key(0), host)


@pytest.mark.parametrize("kind", ["amphista", "eagle", "falcon", "dflash"])  # Medusa, EAGLE-3: as kin
def test_traces_equal_across_loops(target, kind, tmp_path):
    """The fused loop and the host loop give byte-identical step traces (trees, verdicts, cache
    lengths) for each kind of drafter state, at T = 1 so sampled verdicts are compared too; the
    invariant checks pass every step; the trace's appended tokens are the output."""
    import json

    params, cfg, _ = target
    builder = parse_tree("static:eagle1")
    d, dp = make(kind, params, cfg)
    kw = dict(max_new_tokens=12, drafter=d, draft_params=dp, builder=builder, sampling=SamplingConfig(1.0),
              seed=3, check=True)  # fmt: skip
    outs = {
        loop: generate(params, cfg, PROMPTS, loop=loop, trace=tmp_path / loop, **kw)
        for loop in ("device", "python")
    }
    assert (tmp_path / "device").read_bytes() == (tmp_path / "python").read_bytes()
    assert outs["device"].tokens == outs["python"].tokens
    lines = [json.loads(x) for x in (tmp_path / "device").read_text().splitlines()]
    assert sum(len(x["nodes"]) > 1 for x in lines) > 0  # speculative steps were recorded
    for b, toks in enumerate(outs["device"].tokens):
        assert [t for x in lines if x["row"] == b for t in x["accepted"]] == toks[1:]  # prefill gave toks[0]


def test_loaded_falcon_sizes_its_node_state_from_the_tree(target, tmp_path):
    """A Falcon loaded from a checkpoint drafts a tree whose window (71) exceeds any default: its
    per-node features are sized by the loop from the builder, so no node write is dropped and no
    NaN feature is read (the invariant check rejects a non-distribution draft); output = AR."""
    params, cfg, ar = target
    c = falcon.FalconConfig.for_target(cfg, 1, None, k=2)
    trained = eagle.init_params(c, jax.random.PRNGKey(3))  # the arrays a checkpoint stores
    ckpt.save(
        tmp_path / "falcon", "falcon", c, trained, ckpt.target_info(params, cfg, "tiny"), dtype="float32"
    )
    loaded, ldp = ckpt.load(tmp_path / "falcon", params, cfg)
    builder = parse_tree("dynamic:depth=8,topk=10,n=60")
    assert builder.window == 71
    spec = Spec(
        cfg=cfg, sampling=SamplingConfig(), drafter=loaded, builder=builder, verifier=get_verifier("auto")
    )
    prompt, lens, size = pad_prompts(PROMPTS, cfg, 16, window=spec.cache_window)
    state = prefill_jit(params, ldp, jnp.asarray(prompt), jnp.asarray(lens), jax.random.PRNGKey(0),
                        jnp.asarray([-1], jnp.int32), 16, spec=spec, cache_size=size)  # fmt: skip
    assert state.draft.out.shape[1] == 71
    out = generate(params, cfg, PROMPTS, max_new_tokens=16, drafter=loaded, draft_params=ldp, builder=builder,
                   check=True)  # fmt: skip
    assert out.tokens == ar
