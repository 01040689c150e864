"""Speculative vs autoregressive decoding on the embedded target, measured in one run.

For each drafter × tree configuration: tokens/s relative to AR (same loop, no drafter), τ
(tokens per target forward, bonus included), whether the output equals AR's (greedy), compile
time, and the per-step cost split, each piece jitted alone on a state right after prefill:
draft (build the tree), verify_forward (target forward over the tree block, with taps), verifier,
commit (cache commit + append tokens), drafter_update, and the step inside the on-device loop
(`loop_step`: 16 steps of the while_loop / 16); `other` = loop_step - the pieces (loop overhead,
what XLA does differently fused). `not_forward_vs_ar_step` = (loop_step - verify_forward) / the AR
loop step: the cost of speculation beyond the target forward, as a fraction of a T = 1 step.

    python benchmarks/spec_vs_ar.py --max_new_tokens 128 --out runs/spec_vs_ar.json
    python benchmarks/spec_vs_ar.py --config 'ngram|chain:4' --config 'layerskip:6|static:eagle1'
"""

from __future__ import annotations

import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402
from common import cpu_model, load_avg, loop_step_seconds, prefilled, timed, write_json  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "Registry name, HF folder or .gguf path.")
flags.DEFINE_integer("max_new_tokens", 128, "Greedy tokens per prompt.")
flags.DEFINE_integer("repeats", 2, "Timed repeats per prompt (median reported).")
flags.DEFINE_multi_string(
    "config",
    ["ngram|chain:2", "ngram|chain:4", "ngram|chain:8", "eagle|chain:3",
     "eagle|dynamic:depth=5,topk=3,n=10", "eagle3|chain:3", "medusa|chain:2"],
    "drafter|tree (repeatable); drafter = ngram[:n=N,adaptive=0|1] | layerskip:K | eagle | eagle3 | medusa "
    "| a checkpoint folder.",
)  # fmt: skip
flags.DEFINE_string("out", None, "Write results as JSON here.")

PROMPTS = [
    "Rewrite this sentence in the passive voice: The committee approved the new budget after a long debate.",
    "Here is a list: apples, bananas, cherries, dates, elderberries. Repeat the list in reverse order.",
    "Write a Python function that returns the n-th Fibonacci number, then explain it.",
    "What are the main differences between TCP and UDP?",
]


PIECES = ("draft", "verify_forward", "verifier", "commit", "drafter_update")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from specdec.chat import chat_ids
    from specdec.decode import emit
    from specdec.drafters import parse_drafter
    from specdec.generate import generate, warmup
    from specdec.loading import load_model
    from specdec.models import forward, to_device
    from specdec.tree import ancestor_mask, positions
    from specdec.trees import parse_tree

    model = load_model(FLAGS.target)
    cfg, tok = model.cfg, model.tokenizer
    params = to_device(model.params, cfg)
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    n_new = FLAGS.max_new_tokens
    result = {"cpu": cpu_model(), "load_avg_start": load_avg(), "max_new_tokens": n_new, "runs": {}}

    def bench(fn):
        jax.block_until_ready(fn())
        return statistics.median(timed(lambda: jax.block_until_ready(fn()))[1] for _ in range(7))

    def measure(name, **kw):
        _, t_compile = timed(lambda: warmup(params, cfg, [prompts[0]], max_new_tokens=n_new, **kw))
        tps, outs, taus = [], [], []
        for _ in range(FLAGS.repeats):
            for p in prompts:
                o, dt = timed(lambda: generate(params, cfg, [p], max_new_tokens=n_new, **kw))
                tps.append(len(o.tokens[0]) / dt)
                outs.append(o.tokens[0])
                taus.append(o.tau)
        print(f"{name:45s} {statistics.median(tps):6.1f} tok/s  tau {statistics.mean(taus):.2f}  "
              f"compile {t_compile:5.1f} s")  # fmt: skip
        return dict(tokens_per_s=statistics.median(tps), tau=statistics.mean(taus), compile_s=t_compile), outs

    def step_split(drafter, dparams, builder) -> dict[str, float]:
        """Seconds per piece of one step on the state after prefilling prompt 0 (medians of 7)."""
        out = {"loop_step": loop_step_seconds(params, cfg, prompts[0], n_new, drafter, dparams, builder)}
        if drafter is None:
            return out
        spec, state, eos, max_new = prefilled(params, cfg, prompts[0], n_new, drafter, dparams, builder)
        key = jax.random.key(1)
        draft_fn = jax.jit(lambda dp, st: builder(drafter, dp, st.draft, st.ctx, key, spec.sampling))
        tree, draft = draft_fn(dparams, state)

        def verify_fwd(ps, st, tr):
            toks = jnp.where(tr.valid, tr.tokens, 0)
            return forward(ps, cfg, toks, positions(tr, st.cache.lengths), st.cache, ancestor_mask(tr),
                           taps=spec.taps)  # fmt: skip

        verify_fn = jax.jit(verify_fwd)
        logits, taps, cache = verify_fn(params, state, tree)
        verifier_fn = jax.jit(lambda tr, lg: spec.verifier(tr, lg, key, spec.sampling))
        verdict = verifier_fn(tree, logits)

        def commit(st, c, v):
            c = c.commit(v.path, v.n_accepted + 1)
            new = jnp.take_along_axis(tree.tokens, v.path, axis=1)
            return emit(st.replace(cache=c), new, v.n_accepted + 1, eos, max_new)[0]

        commit_fn = jax.jit(commit)
        st2 = commit_fn(state, cache, verdict)
        update_fn = jax.jit(lambda dp, st, v, tp: drafter.update(dp, draft, st.ctx, tree, v, tp))
        out["draft"] = bench(lambda: draft_fn(dparams, state))
        out["verify_forward"] = bench(lambda: verify_fn(params, state, tree))
        out["verifier"] = bench(lambda: verifier_fn(tree, logits))
        out["commit"] = bench(lambda: commit_fn(state, cache, verdict))
        out["drafter_update"] = bench(lambda: update_fn(dparams, st2, verdict, taps))
        return out

    ar, ar_outs = measure("AR")
    ar["step_ms"] = {k: v * 1e3 for k, v in step_split(None, None, None).items()}
    ar_step = ar["step_ms"]["loop_step"]
    result["runs"]["AR"] = ar
    print(f"{'':45s} AR loop step {ar_step:.1f} ms")
    for c in FLAGS.config:
        jax.clear_caches()  # many compiled loops in one process reach vm.max_map_count otherwise
        dname, _, tname = c.partition("|")
        builder = parse_tree(tname)
        drafter, dparams = parse_drafter(dname, params, cfg, max_depth=builder.max_depth)
        kw = dict(drafter=drafter, draft_params=dparams, builder=builder)
        r, outs = measure(c, **kw)
        r["speedup"] = r["tokens_per_s"] / ar["tokens_per_s"]
        r["identical_to_ar"] = outs == ar_outs
        r["step_ms"] = {k: v * 1e3 for k, v in step_split(drafter, dparams, builder).items()}
        r["step_ms"]["other"] = r["step_ms"]["loop_step"] - sum(r["step_ms"][k] for k in PIECES)
        r["not_forward_vs_ar_step"] = (r["step_ms"]["loop_step"] - r["step_ms"]["verify_forward"]) / ar_step
        result["runs"][c] = r
        print(f"{'':45s} speedup {r['speedup']:.2f}x  identical {r['identical_to_ar']}  step ms "
              + " ".join(f"{k}={v:.1f}" for k, v in r["step_ms"].items())
              + f"  not-forward {r['not_forward_vs_ar_step']:.0%} of an AR step")  # fmt: skip
    result["load_avg_end"] = load_avg()
    write_json(result, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
