"""PEARL (specdec.pearl): greedy parity with AR, the sampled law at T > 0 with negative controls, the
mode machine on an oracle and an always-wrong drafter, both caches against a fresh prefill after
every round, and the two-device runner against the single-device loop. Torch-free tiny models."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from specdec import pearl as P
from specdec import pearl_gamma
from specdec.cache import KVCache, causal_mask
from specdec.decode import emit
from specdec.drafters import DraftModel, layer_skip
from specdec.generate import generate, pad_prompts
from specdec.models import forward, to_device
from specdec.sampling import sample
from tests import test_spec_stats
from tests.test_spec_stats import FAIL_P, PASS_P, PROMPT, ROWS, T1, L, chi_square

PROMPTS = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13], list(range(20, 41))]  # ragged: 8, 2 and 21 tokens
# the peaked V = 8 world of the speculative loop's chi-square tests (its fixture, under this name):
# (params, cfg, layer-skip drafter, its params, the exact law of the first L tokens per SamplingConfig)
peaked = test_spec_stats.world
N_NEW = 16


@pytest.fixture(scope="module")
def tiny(tiny_targets):
    """(params, cfg, layer-skip drafter, its params) of the tiny random llama."""
    loaded = tiny_targets["llama"]
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    return (params, cfg, *layer_skip(params, cfg, 1))


def _pearl(tiny, prompts=PROMPTS, n_new=N_NEW, **kw):
    params, cfg, d, dp = tiny
    kw = {"drafter": d, "draft_params": dp, **kw}
    return P.pearl_generate(params, cfg, prompts, max_new_tokens=n_new, **kw)


# ------------------------------------------------------------------------------------- greedy parity
@pytest.mark.parametrize("gamma,loop", [(2, "python"), (4, "device")])
def test_greedy_equals_ar(tiny, gamma, loop):
    """Ragged rows, one stopped by EOS (a token AR emits mid-way), the others by max_new."""
    params, cfg, _, _ = tiny
    free = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW).tokens
    eos = free[0][5]  # row 0 stops at its first occurrence
    ar = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW, eos_ids=[eos])
    out = _pearl(tiny, gamma=gamma, loop=loop, eos_ids=[eos])
    assert out.tokens == ar.tokens
    assert out.finished == ar.finished and out.finished[0] and len(out.tokens[0]) <= 6
    assert any(len(r) == N_NEW for r in out.tokens)
    for counts, modes in zip(out.round_tokens, out.round_modes, strict=True):
        assert modes[0] == P.PRE  # every row starts in PRE
        assert all(1 <= c <= gamma for c in counts[:-1])  # the last round may be cut by EOS/max_new
        assert all(c == 1 for c, m in zip(counts[:-1], modes, strict=False) if m == P.PRE)
    assert sum(out.accepted_hist[k] * k for k in range(gamma + 1)) == sum(len(r) - 1 for r in out.tokens)


# ------------------------------------------------------------------------- the mode machine, exactly
def test_oracle_drafter_stays_in_post(tiny):
    """Draft = target at T = 0: round 1 (PRE) emits 1 token, every later round is POST with γ."""
    params, cfg, _, _ = tiny
    ar = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW).tokens
    out = _pearl(tiny, drafter=DraftModel(cfg), draft_params=params, gamma=3)
    assert out.tokens == ar
    for counts, modes in zip(out.round_tokens, out.round_modes, strict=True):
        assert modes == [P.PRE] + [P.POST] * (len(modes) - 1)
        assert counts == [1] + [3] * (len(counts) - 2) + [min(3, N_NEW - 2 - 3 * (len(counts) - 2))]
    assert out.accepted_hist == [0, 3, 3, 12]  # per row: 1, then 3 x 4, then the last 2 (max_new)
    assert out.draft_calls == out.verify_width == 3 * out.steps  # γ draft forwards, a γ-wide block


def test_always_wrong_drafter_stays_in_pre(tiny):
    """A draft whose argmax is the target's argmin (its head negated) is always rejected: every
    round is PRE and emits the target's correction, 1 token; the output is still AR's."""
    params, cfg, _, _ = tiny
    ar = generate(params, cfg, PROMPTS, max_new_tokens=N_NEW).tokens
    wrong = {**params, "lm_head": jax.tree.map(lambda w: -w, params["lm_head"])}
    out = _pearl(tiny, drafter=DraftModel(cfg), draft_params=wrong, gamma=3)
    assert out.tokens == ar
    for counts, modes in zip(out.round_tokens, out.round_modes, strict=True):
        assert set(modes) == {P.PRE} and set(counts) == {1} and len(counts) == N_NEW - 1
    assert out.accepted_hist == [0, 3 * (N_NEW - 1), 0, 0]


# ------------------------------------------------------------------------------- caches, every round
def test_caches_equal_a_fresh_prefill_after_every_round(peaked):
    """At T = 1 on the peaked world (rejections in both modes): after every round, for every running
    row, the target cache holds exactly C without its root and the draft cache exactly (C + U)
    without its last token, equal to a fresh prefill of those tokens (f32, 1e-5); the draft root is
    the last of C + U. Rollbacks move only the lengths, so this checks that every kept entry is right."""
    params, cfg, d, dp, _ = peaked
    prompts = [[3, 4, 5, 6], [1, 2], [7, 6, 5, 4, 3, 2, 1, 0, 7]]  # ragged, in the vocabulary of 8
    pearl = P.Pearl(cfg, d, T1, 3)
    toks, lens, size = pad_prompts(prompts, cfg, N_NEW, None, pearl.window)
    eos, max_new = jnp.asarray([-1], jnp.int32), jnp.int32(N_NEW)
    state = P.prefill_jit(params, dp, jnp.asarray(toks), jnp.asarray(lens), jax.random.key(3), eos, max_new,
                          pearl=pearl, cache_size=size, rounds=N_NEW)  # fmt: skip

    def fresh(p, mcfg):
        pos = jnp.arange(size)[None]
        empty, mask = KVCache.init(mcfg, 1, size), causal_mask(1, size)
        return jax.jit(lambda seq: forward(p, mcfg, seq, pos, empty, mask)[2])

    fresh_t, fresh_d = fresh(params, cfg), fresh(dp, d.cfg)
    seen = {P.PRE: 0, P.POST: 0, "post_reject": 0}
    while True:
        t, dr = jax.device_get(state.target), jax.device_get(state.draft)
        for b in np.flatnonzero(~t.done):
            c = t.tokens[b, : t.length[b]].tolist()
            seq = c + (t.unverified[b].tolist() if t.post[b] else [])
            assert t.cache.lengths[b] == len(c) - 1 and dr.cache.lengths[b] == len(seq) - 1
            assert dr.root[b] == seq[-1]
            for cache, ref_fn, sq in ((t.cache, fresh_t, c), (dr.cache, fresh_d, seq)):
                ref, n = ref_fn(jnp.asarray([sq + [0] * (size - len(sq))], jnp.int32)), len(sq) - 1
                for got, want in ((cache.k, ref.k), (cache.v, ref.v)):
                    np.testing.assert_allclose(
                        got[:, b, :n], np.asarray(want)[:, 0, :n], rtol=1e-5, atol=1e-5
                    )
        if t.done.all():
            break
        before = t
        state = P.step_jit(params, dp, state, eos, max_new, pearl=pearl)
        after = jax.device_get(state.target)
        for b in np.flatnonzero(~before.done):
            seen[int(before.post[b])] += 1
            if before.post[b] and not after.post[b]:
                seen["post_reject"] += 1
    assert seen[P.PRE] and seen[P.POST] and seen["post_reject"], seen  # every branch was exercised


# ------------------------------------------------------------------------------------ the law at T > 0
def skip_residual(x, q, target_logits, m, key, sampling):
    """BROKEN: the correction after a rejection is drawn from p_n instead of norm((p_n - q_n)+)."""
    n, _ = P.chain_verify(x, q, target_logits, m, key, sampling)
    p_n = target_logits[jnp.arange(x.shape[0]), jnp.minimum(n, x.shape[1] - 1)]
    return n, sample(jax.random.fold_in(key, 1), p_n, sampling)


def bonus_step(params, dparams, state, eos_ids, max_new, *, pearl):
    """BROKEN: a PEARL round that, after an all-accept POST run, also emits a bonus token drawn from
    the last target law the block computed (the law of e_1's position, not of the position after
    it). The state after the bonus is not kept consistent: the harness compares only the first L
    tokens and max_new = L stops every row there."""
    draft, prop = P.draft_round(pearl, dparams, state.draft)
    logits, cache = P.target_forward(pearl, params, state.target)
    target, msg = P.settle(pearl, state.target, logits, cache, prop, eos_ids, max_new)
    all_in = state.target.post & ~state.target.done & (target.length - state.target.length == pearl.gamma)
    bonus = sample(jax.random.fold_in(state.target.key, 10_000 + state.target.steps), logits[:, -1],
                   pearl.sampling)  # fmt: skip
    target, _ = emit(target, bonus[:, None], all_in.astype(jnp.int32), eos_ids, max_new)
    return P.PearlState(target=target.replace(post=target.post & ~all_in), draft=P.receive(draft, msg))


def pearl_rows(peaked, gamma, sampling, verify=P.chain_verify, step_fn=None, seed=0):
    """PEARL on ROWS copies of PROMPT (L new tokens each): the PearlOutput."""
    params, cfg, drafter, dparams, _ = peaked
    if step_fn is None:
        kw = dict(
            drafter=drafter, draft_params=dparams, gamma=gamma, sampling=sampling, seed=seed, verify=verify
        )
        return P.pearl_generate(params, cfg, [PROMPT] * ROWS, max_new_tokens=L, **kw)
    pearl = P.Pearl(cfg, drafter, sampling, gamma, verify)
    toks, lens, size = pad_prompts([PROMPT] * ROWS, cfg, L, None, pearl.window)
    eos, max_new = jnp.asarray([-1], jnp.int32), jnp.int32(L)
    state = P.prefill_jit(params, dparams, jnp.asarray(toks), jnp.asarray(lens), jax.random.key(seed), eos,
                          max_new, pearl=pearl, cache_size=size, rounds=L)  # fmt: skip
    fn = jax.jit(step_fn, static_argnames=("pearl",))
    while not bool(jnp.all(state.target.done)):
        state = fn(params, dparams, state, eos, max_new, pearl=pearl)
    return P.output(state.target, lens, np.asarray([-1]), gamma)


@pytest.mark.parametrize("gamma,sampling", [(2, T1)], ids=["g2-T1"])
def test_emitted_tokens_follow_the_target_law(peaked, gamma, sampling):
    """prefill's token, a PRE round, then POST rounds (accepting all of U + e_1 with no bonus, or
    rejecting inside U) or PRE again: the first L tokens follow the target's exact joint law."""
    out = pearl_rows(peaked, gamma, sampling)
    assert all(len(r) == L for r in out.tokens)
    pval, impossible = chi_square(out.tokens, peaked[4](sampling))
    pairs = zip(out.round_tokens, out.round_modes, strict=True)
    rounds = [(c, m) for cs, ms in pairs for c, m in zip(cs, ms, strict=True)]
    full_post = sum(m == P.POST and c == gamma for c, m in rounds)
    pre_reject = sum(ms[:2] == [P.PRE, P.PRE] for ms in out.round_modes)
    print(f"gamma {gamma}: p = {pval:.3g}, all-accept POST rounds {full_post}, PRE rejections {pre_reject}")
    assert full_post > 200 and pre_reject > 200  # both branches exercised, often
    assert impossible == 0
    assert pval > PASS_P, pval


@pytest.mark.parametrize("gamma,verify,step_fn", [(2, skip_residual, None), (1, P.chain_verify, bonus_step)],
                         ids=["skip_residual", "bonus_after_all_accept"])  # fmt: skip
def test_negative_control_is_rejected(peaked, gamma, verify, step_fn):
    """The same harness rejects each broken round: otherwise a pass above means nothing."""
    out = pearl_rows(peaked, gamma, T1, verify=verify, step_fn=step_fn)
    pval, impossible = chi_square(out.tokens, peaked[4](T1))
    print(f"{(step_fn or verify).__name__}: p = {pval:.3g}, impossible {impossible}")
    assert pval < FAIL_P, pval


def test_profile_gamma_is_the_step_time_ratio(tiny):
    params, cfg, d, dp = tiny
    prof = pearl_gamma.profile_gamma(params, cfg, d, dp, context=20, steps=3)
    assert prof.target_step_s > 0 and prof.draft_step_s > 0
    assert prof.gamma == max(1, round(prof.target_step_s / prof.draft_step_s))


# ------------------------------------------------------------------------------------------ two devices
TWO_DEVICES = textwrap.dedent(
    """
    import json, sys
    import jax
    if len(jax.devices()) < 2:
        print(json.dumps({"skip": f"{len(jax.devices())} device(s) on {jax.default_backend()}"}))
        sys.exit(0)
    from specdec import pearl, pearl_mesh
    from specdec.drafters import layer_skip
    from specdec.loading import load_hf_folder
    from specdec.models import to_device
    loaded = load_hf_folder(sys.argv[1])
    cfg = loaded.cfg.replace(eos_token_ids=())
    params = to_device(loaded.params, cfg)
    d, dp = layer_skip(params, cfg, 1)
    devices = pearl_mesh.parse_roles("draft=1,target=1")
    out = pearl.pearl_generate(params, cfg, json.loads(sys.argv[2]), drafter=d, draft_params=dp, gamma=4,
                               max_new_tokens=int(sys.argv[3]), devices=devices)
    print(json.dumps(dict(tokens=out.tokens, modes=out.round_modes, steps=out.steps,
                          devices=[str(x) for x in devices])))
    """
)


def test_two_devices_equal_one_device(tiny, tmp_path):
    """The host-driven two-device runner (draft on device 0, target on device 1) gives the single-device
    loop's greedy tokens, modes and rounds. In this process when it has two devices, else in a
    subprocess with two simulated CPU devices on the same tiny checkpoint (`write_tiny` is
    deterministic)."""
    import os

    from specdec import pearl_mesh
    from tests.conftest import write_tiny

    one = _pearl(tiny, gamma=4)
    if len(jax.devices()) >= 2:
        devices = pearl_mesh.parse_roles("draft=1,target=1")
        out = _pearl(tiny, gamma=4, devices=devices)
        two = dict(tokens=out.tokens, modes=out.round_modes, steps=out.steps, devices=list(map(str, devices)))
    else:
        write_tiny("llama", tmp_path)
        xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
        env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, "-c", TWO_DEVICES, str(tmp_path), json.dumps(PROMPTS), str(N_NEW)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        two = json.loads(r.stdout.strip().splitlines()[-1])
        if "skip" in two:
            pytest.skip(f"two devices unavailable: {two['skip']}")
    assert two["devices"][0] != two["devices"][1]
    assert two["tokens"] == one.tokens and two["modes"] == one.round_modes and two["steps"] == one.steps


# ----------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "args,message",
    [
        (["--gamma", "3"], "use it with --loop pearl"),
        (["--mesh", "draft=1,target=1"], "use it with --loop pearl"),
        (["--loop", "pearl"], "needs a token-level --drafter"),
        (["--loop", "pearl", "--drafter", "layerskip:1", "--tree", "chain:3"], "drop --tree"),
        (["--loop", "pearl", "--drafter", "layerskip:1", "--check"], "drop it with --loop pearl"),
        (["--loop", "pearl", "--drafter", "layerskip:1", "--mesh", "data=2"], "draft=1,target=1"),
        (["--loop", "pearl", "--drafter", "layerskip:1", "--gamma", "two"], "whole number"),
    ],
)
def test_cli_refuses_bad_combinations(args, message):
    """specdec-generate's PEARL flags: bad combinations are refused before anything loads (a
    ValueError, printed by the console wrapper as one `specdec-generate: error: ...` line, exit 2)."""
    from specdec.cli import generate as cli
    from specdec.cli.entry import parse_flags

    parse_flags(cli.FLAGS, ["specdec-generate", *args])
    with pytest.raises(ValueError, match=message):
        cli._check_pearl_flags()


def test_cli_reads_gamma():
    from specdec.cli import generate as cli
    from specdec.cli.entry import parse_flags

    for args, gamma in ((["--gamma", "5"], 5), (["--gamma", "auto"], 0), (["--gamma", "0"], 0), ([], 0)):
        parse_flags(cli.FLAGS, ["specdec-generate", "--loop", "pearl", "--drafter", "layerskip:2", *args])
        assert cli._check_pearl_flags() == gamma
    parse_flags(cli.FLAGS, ["specdec-generate"])
    assert cli._check_pearl_flags() is None
