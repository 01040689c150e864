"""PEARL against AR and standard speculation on the embedded target, measured in one run.

Methods, each greedy on the first turn of MT-Bench questions (chat template), interleaved per
question so a busy machine slows all of them alike:

    AR              the standard loop, no drafter (both cores for one model)
    SD              layerskip:K | chain:γ, the standard speculative loop (both cores, one model at a time)
    PEARL 1 device  specdec.pearl on one device: draft and target serialised (the reference)
    PEARL 2 devices draft on CPU device 0, target on CPU device 1, dispatched concurrently every round

γ = round(target step / draft step), measured first (`profile_gamma`, each model alone on its
device). The concurrency probe times one PEARL draft round (γ draft steps) and one γ-wide target
forward alone and dispatched together on the two devices: overlap = (alone sum - together) /
min(alone), 1 = perfect concurrency, 0 = serialised; a single-threaded control program (no
intra-op threads) shows whether the two devices run at once at all. Busy cores = this process's
CPU seconds / wall seconds while a method ran (other processes' load is in the load averages).
Every prompt is warmed up first (each prompt-length bucket compiles its own programs).

    python benchmarks/pearl.py --questions 4 --max_new_tokens 128 --out docs/results/pearl_<cpu>.json
    python benchmarks/pearl.py --xla_extra "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"

Two host devices exist only if XLA_FLAGS sets a device count before JAX starts: this script adds
`--xla_force_host_platform_device_count=2` (and `--xla_extra`) to XLA_FLAGS itself.
"""

from __future__ import annotations

import os
import statistics
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "Registry name, HF folder or .gguf path.")
flags.DEFINE_string("drafter", "layerskip:6", "The token-level drafter (layerskip:K or a draft model).")
flags.DEFINE_integer("questions", 4, "MT-Bench questions (first turns), in file order.")
flags.DEFINE_integer("max_new_tokens", 128, "Greedy tokens per question.")
flags.DEFINE_integer("repeats", 1, "Timed repeats per question and method (median).")
flags.DEFINE_integer("gamma", 0, "PEARL / SD draft length; 0 = measured ratio of step times.")
flags.DEFINE_string("xla_extra", "", "Extra XLA_FLAGS for this run (threading experiments).")
flags.DEFINE_bool("probe_only", False, "Measure γ and the concurrency probe only (no decoding).")
flags.DEFINE_string("out", None, "Write results as JSON here.")


def _setup_env(argv) -> None:
    """XLA_FLAGS before JAX starts: two host devices (+ --xla_extra, read from argv: absl has not
    parsed yet)."""
    extra = ""
    for i, a in enumerate(argv):
        if a.startswith("--xla_extra="):
            extra = a.split("=", 1)[1]
        elif a == "--xla_extra" and i + 1 < len(argv):
            extra = argv[i + 1]
    xla = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in xla:
        xla += " --xla_force_host_platform_device_count=2"
    os.environ["XLA_FLAGS"] = f"{xla} {extra}".strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from common import cpu_model, load_avg, timed, write_json

    from specdec.chat import chat_ids
    from specdec.drafters import parse_drafter
    from specdec.eval.questions import load_questions
    from specdec.generate import generate, warmup
    from specdec.loading import load_model
    from specdec.models import to_device
    from specdec.pearl import Pearl, draft_round, prefill_draft, prefill_target, receive
    from specdec.pearl import target_forward as pearl_target_forward
    from specdec.pearl_gamma import profile_gamma
    from specdec.pearl_mesh import parse_roles
    from specdec.trees import parse_tree

    devs = parse_roles("draft=1,target=1")
    model = load_model(FLAGS.target)
    cfg, tok = model.cfg, model.tokenizer
    params = to_device(model.params, cfg)  # on device 0: the single-device methods
    drafter, dparams = parse_drafter(FLAGS.drafter, params, cfg, max_depth=1)
    params_t = jax.device_put(params, devs[1])  # the two-device run: target on device 1,
    dparams_d = jax.device_put(dparams, devs[0])  # draft on device 0
    questions = load_questions("mt_bench")[: FLAGS.questions]
    prompts = [chat_ids(tok, q.turns[0]) for q in questions]
    n_new = FLAGS.max_new_tokens
    ctx = int(statistics.mean(len(p) for p in prompts)) + n_new // 2
    result = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "load_avg_start": load_avg(), "jax": jax.__version__,
        "xla_flags": os.environ["XLA_FLAGS"], "target": model.source, "drafter": FLAGS.drafter,
        "questions": [q.question_id for q in questions], "max_new_tokens": n_new,
    }  # fmt: skip

    # γ from the step-time ratio, each model alone on its device (nano-PEARL's rule)
    prof2 = profile_gamma(params_t, cfg, drafter, dparams_d, context=ctx, devices=devs)
    prof1 = profile_gamma(params, cfg, drafter, dparams, context=ctx)
    gamma = FLAGS.gamma or prof2.gamma
    result["gamma"] = gamma
    ms = lambda pr: {"target_step_ms": pr.target_step_s * 1e3, "draft_step_ms": pr.draft_step_s * 1e3,
                     "gamma": pr.gamma}  # fmt: skip
    result["profile"] = {"two_devices": ms(prof2), "one_device": ms(prof1)}
    print(f"gamma {gamma}: {result['profile']}")
    result["concurrency"] = concurrency_probe(jax, jnp, Pearl(cfg, drafter, gamma=gamma), params_t, dparams_d,
                                              prompts[0], ctx, devs, prefill_target, prefill_draft, receive,
                                              draft_round, pearl_target_forward)  # fmt: skip
    result["concurrency"]["single_thread_control"] = single_thread_control(jax, jnp, devs)
    print(f"concurrency: {result['concurrency']}")
    if FLAGS.probe_only:
        result["load_avg_end"] = load_avg()
        write_json(result, FLAGS.out)
        return

    builder = parse_tree(f"chain:{gamma}")
    sd_drafter, sd_params = parse_drafter(FLAGS.drafter, params, cfg, max_depth=builder.max_depth)
    methods = {
        "AR": (params, dict()),
        f"SD {FLAGS.drafter}|chain:{gamma}": (params, dict(drafter=sd_drafter, draft_params=sd_params,
                                                          builder=builder)),
        "PEARL 1 device": (params, dict(loop="pearl", drafter=drafter, draft_params=dparams, gamma=gamma)),
        "PEARL 2 devices": (params_t, dict(loop="pearl", drafter=drafter, draft_params=dparams_d, gamma=gamma,
                                           roles=devs)),
    }  # fmt: skip
    runs = {name: {"tps": {}, "tokens": {}, "tau": [], "cpu_s": 0.0, "wall_s": 0.0} for name in methods}
    for name, (p, kw) in methods.items():  # every prompt: a new length bucket compiles its own programs
        _, runs[name]["compile_s"] = timed(
            lambda: [warmup(p, cfg, [q], max_new_tokens=n_new, **kw) for q in prompts]
        )
    for _ in range(FLAGS.repeats):
        for i, prompt in enumerate(prompts):
            for name, (p, kw) in methods.items():
                c0 = os.times()
                out, dt = timed(lambda: generate(p, cfg, [prompt], max_new_tokens=n_new, **kw))
                c1 = os.times()
                r = runs[name]
                r["cpu_s"] += (c1.user - c0.user) + (c1.system - c0.system)
                r["wall_s"] += dt
                r["tps"].setdefault(i, []).append(len(out.tokens[0]) / dt)
                r["tokens"][i] = out.tokens[0]
                r["tau"].append(out.tau)
                if hasattr(out, "round_modes"):
                    r.setdefault("post_rounds", []).append(sum(out.round_modes[0]))
                    r.setdefault("rounds", []).append(out.steps)
    ar_tokens = runs["AR"]["tokens"]
    table = {}
    for name, r in runs.items():
        tps = statistics.mean(statistics.median(v) for v in r["tps"].values())
        row = {
            "tokens_per_s": tps, "tau": statistics.mean(r["tau"]), "compile_s": r["compile_s"],
            "busy_cores": r["cpu_s"] / r["wall_s"], "identical_to_ar": r["tokens"] == ar_tokens,
            "per_question_tokens_per_s": {questions[i].question_id: statistics.median(v)
                                          for i, v in r["tps"].items()},
        }  # fmt: skip
        if "rounds" in r:  # a PEARL round's wall time: serialised draft + target, or overlapped
            row["post_round_fraction"] = sum(r["post_rounds"]) / sum(r["rounds"])
            row["ms_per_round"] = r["wall_s"] / sum(r["rounds"]) * 1e3
        table[name] = row
    for row in table.values():
        row["speedup_vs_ar"] = row["tokens_per_s"] / table["AR"]["tokens_per_s"]
    result["runs"] = table
    result["load_avg_end"] = load_avg()
    print(f"\n{'method':34s} {'tok/s':>7s} {'vs AR':>6s} {'tau':>5s} {'busy cores':>10s}  identical")
    for name, row in table.items():
        print(f"{name:34s} {row['tokens_per_s']:7.1f} {row['speedup_vs_ar']:6.2f} {row['tau']:5.2f} "
              f"{row['busy_cores']:10.2f}  {row['identical_to_ar']}")  # fmt: skip
    rounds = {k: f"{v['ms_per_round']:.1f}" for k, v in table.items() if "ms_per_round" in v}
    print(f"ms per PEARL round: {rounds}")
    print(f"load average {result['load_avg_start']} -> {result['load_avg_end']}; {result['cpu']}")
    write_json(result, FLAGS.out)


def concurrency_probe(jax, jnp, pearl, params_t, dparams_d, prompt, ctx, devs, prefill_target, prefill_draft,
                      receive, draft_round, target_forward, repeats: int = 15) -> dict:  # fmt: skip
    """Milliseconds of one draft round (device 0) and one γ-wide target forward (device 1), alone and
    dispatched together, on states prefilled from `prompt`: the three interleaved `repeats` times,
    medians and minima (the minimum is the least disturbed by other processes)."""
    import numpy as np
    from common import timed

    size = 1 << (max(ctx, len(prompt)) + 2 * pearl.gamma).bit_length()
    toks = np.asarray([prompt], np.int32)
    lens = np.asarray([len(prompt)], np.int32)
    key, eos = jax.random.key(0), np.asarray([-1], np.int32)
    put = jax.device_put
    target, msg = jax.jit(lambda *a: prefill_target(pearl, *a, cache_size=size, rounds=4))(
        params_t, put(toks, devs[1]), put(lens, devs[1]), put(key, devs[1]), put(eos, devs[1]),
        put(jnp.int32(8), devs[1]),
    )  # fmt: skip
    draft = jax.jit(lambda *a: prefill_draft(pearl, *a, cache_size=size))(
        dparams_d, put(toks, devs[0]), put(lens, devs[0]), put(key, devs[0])
    )
    draft = receive(draft, put(msg, devs[0]))
    d_fn = jax.jit(lambda dp, d: draft_round(pearl, dp, d))
    t_fn = jax.jit(lambda p, t: target_forward(pearl, p, t))
    run_d = lambda: jax.block_until_ready(d_fn(dparams_d, draft))
    run_t = lambda: jax.block_until_ready(t_fn(params_t, target))
    run_both = lambda: jax.block_until_ready((d_fn(dparams_d, draft), t_fn(params_t, target)))
    fns = {"draft_round_ms": run_d, "target_forward_ms": run_t, "together_ms": run_both}
    for f in fns.values():
        f()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            times[name].append(timed(f)[1] * 1e3)
    out = {}
    for stat, agg in (("median", statistics.median), ("min", min)):
        d_ms, t_ms, both_ms = (agg(times[name]) for name in fns)
        out[stat] = {"draft_round_ms": d_ms, "target_forward_ms": t_ms, "together_ms": both_ms,
                     "overlap": (d_ms + t_ms - both_ms) / min(d_ms, t_ms)}  # fmt: skip
    return out


def single_thread_control(jax, jnp, devs, repeats: int = 7) -> dict:
    """A program too small for intra-op threads (3000 dependent 64x64 matmuls): milliseconds alone
    on each device, on both devices together, and twice on one device (minima). Together ~ alone
    means the two devices really run at once; ~ twice means they are serialised."""
    from common import timed

    f = jax.jit(lambda x: jax.lax.fori_loop(0, 3000, lambda i, y: jnp.tanh(y @ x), x))
    a, b = (jax.device_put(jnp.eye(64) * 0.5, d) for d in devs)
    jax.block_until_ready((f(a), f(b)))
    runs = {"alone_ms": lambda: f(a), "two_devices_together_ms": lambda: (f(a), f(b)),
            "one_device_twice_ms": lambda: (f(a), f(a))}  # fmt: skip
    return {k: min(timed(lambda: jax.block_until_ready(fn()))[1] for _ in range(repeats)) * 1e3
            for k, fn in runs.items()}  # fmt: skip


if __name__ == "__main__":
    _setup_env(sys.argv)
    app.run(main)
