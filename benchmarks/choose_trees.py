"""Hardware-aware tree choice (Sequoia-style): acceptance per depth × this machine's step cost.

For each drafter, one deep chain run on MT-Bench first turns measures the acceptance per depth
a(d) = P(accepted path reaches depth d). A chain of k drafts accepts min(accepted, k) of the same
drafts, so its τ is predicted exactly in expectation: τ(k) = 1 + Σ_{d ≤ k} a(d). The step cost of
chain:k is measured on this machine (16 steps of the on-device loop / 16, after prefill), and the
predicted speedup is τ(k) / (step(k) / AR step). Dynamic and static trees cannot be predicted
from a chain, so their τ and step are measured directly on the same prompts. Everything in one
run, against one AR baseline; `specdec-eval` on all of MT-Bench is the direct check of a choice.
For the adaptive n-gram drafter (an AR step when nothing matches) the step cost on prompt 0 is a
mix of both kinds of step, so its prediction is rougher.

    python benchmarks/choose_trees.py --out runs/choose_trees.json
    python benchmarks/choose_trees.py --drafter eagle --chains 1,2,3,4 --tree "dynamic:depth=4,topk=2,n=8"
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402
from common import load_avg, loop_step_seconds, write_json  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_multi_string("drafter", ["ngram", "eagle", "eagle3", "medusa"], "Drafters to size trees for.")
flags.DEFINE_list("chains", ["1", "2", "3", "4", "5", "6", "8"], "Chain lengths k whose step is timed.")
flags.DEFINE_multi_string(
    "tree",
    ["dynamic:depth=3,topk=2,n=6", "dynamic:depth=4,topk=2,n=8", "dynamic:depth=5,topk=3,n=12"],
    "Non-chain trees measured directly for the trained drafters (repeatable).",
)  # fmt: skip
flags.DEFINE_integer("questions", 8, "MT-Bench first turns used (one per category, then the next).")
flags.DEFINE_integer("max_new_tokens", 96, "Greedy tokens per prompt.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")


def main(argv):
    del argv
    import jax

    from specdec.chat import chat_ids
    from specdec.drafters import parse_drafter
    from specdec.eval.questions import load_questions
    from specdec.generate import generate
    from specdec.loading import load_model
    from specdec.models import to_device
    from specdec.trees import parse_tree

    model = load_model("smollm2-135m-instruct")
    cfg, tok = model.cfg, model.tokenizer
    params = to_device(model.params, cfg)
    qs = load_questions("mt_bench")
    by_cat: dict[str, list] = {}
    for q in qs:
        by_cat.setdefault(q.category, []).append(q)
    picked = [q for rank in range(10) for c in by_cat.values() if rank < len(c) for q in [c[rank]]]
    prompts = [chat_ids(tok, q.turns[0]) for q in picked[: FLAGS.questions]]
    n_new = FLAGS.max_new_tokens
    result = {
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "prompts": len(prompts),
        "drafters": {},
    }

    def step_ms(drafter, dparams, builder) -> float:
        return loop_step_seconds(params, cfg, prompts[0], n_new, drafter, dparams, builder) * 1e3

    def tau_and_hist(**kw):
        outs = [generate(params, cfg, [p], max_new_tokens=n_new, **kw) for p in prompts]
        hist = [sum(o.accepted_hist[i] for o in outs) for i in range(len(outs[0].accepted_hist))]
        steps = sum(sum(o.row_steps) for o in outs)
        return sum(k * c for k, c in enumerate(hist)) / steps, hist

    ar_step = step_ms(None, None, None)
    result["ar_step_ms"] = ar_step
    print(f"AR step {ar_step:.1f} ms")
    for name in FLAGS.drafter:
        # XLA:CPU maps every executable into memory regions; one process compiling ~50 of these
        # loops reaches vm.max_map_count ("LLVM compilation error: Cannot allocate memory").
        jax.clear_caches()
        ks = [int(k) for k in FLAGS.chains if name != "medusa" or int(k) <= 4]  # Medusa: 4 heads
        k_max = max(ks)
        deep = parse_tree(f"chain:{k_max}")
        drafter, dparams = parse_drafter(name, params, cfg, max_depth=deep.max_depth)
        tau_deep, hist = tau_and_hist(drafter=drafter, draft_params=dparams, builder=deep)
        n = sum(hist)
        accept = [sum(hist[d + 1 :]) / n for d in range(1, k_max + 1)]  # a(d), d = 1..k_max
        rows = {}
        for k in ks:
            tree = parse_tree(f"chain:{k}")
            d, dp = parse_drafter(name, params, cfg, max_depth=tree.max_depth)
            tau = 1 + sum(accept[:k])
            ms = step_ms(d, dp, tree)
            rows[f"chain:{k}"] = {
                "tau_predicted": tau,
                "step_ms": ms,
                "speedup_predicted": tau * ar_step / ms,
            }
            print(f"{name:7s} chain:{k:<2d} tau {tau:.2f} (pred)  step {ms:5.1f} ms  "
                  f"speedup {tau * ar_step / ms:.2f}x (pred)")  # fmt: skip
        if name != "ngram":
            for spec_ in FLAGS.tree:
                tree = parse_tree(spec_)
                d, dp = parse_drafter(name, params, cfg, max_depth=tree.max_depth)
                tau, _ = tau_and_hist(drafter=d, draft_params=dp, builder=tree)
                ms = step_ms(d, dp, tree)
                rows[spec_] = {"tau_measured": tau, "step_ms": ms, "speedup_predicted": tau * ar_step / ms}
                print(f"{name:7s} {spec_:28s} tau {tau:.2f} (meas) step {ms:5.1f} ms  "
                      f"speedup {tau * ar_step / ms:.2f}x")  # fmt: skip
        best = max(rows, key=lambda r: rows[r]["speedup_predicted"])
        result["drafters"][name] = {"acceptance_per_depth": accept, "tau_chain_deep": tau_deep, "trees": rows,
                                    "best": best}  # fmt: skip
        print(f"{name:7s} best on this machine: {best} ({rows[best]['speedup_predicted']:.2f}x predicted)")
    result["load_avg_end"] = load_avg()
    write_json(result, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
