"""Batch throughput: speculative vs autoregressive decoding at batch 1..32, in one run.

Rows of a batch accept different numbers of tokens per step (ragged acceptance); a batch runs
until its slowest row is done, so speculation pays less as the batch grows and the target's
forward turns compute-bound. For each batch size B: the first B MT-Bench first turns (chat
template), greedy, `--max_new_tokens` each; AR and every `--config` decode the same batch, timed
alternately (`--repeats`, median). Throughput = Σ new tokens / wall seconds of the call; the
ratio to AR is taken per repeat pair, so a drift in machine load hits both alike. τ pools the
rows' steps. Writes JSON and a plot (throughput and ratio vs B).

    python benchmarks/batch_throughput.py --out runs/batch_throughput.json
    python benchmarks/batch_throughput.py --batch 1,8 --config 'eagle|chain:3' --mesh data=2,model=4
    python benchmarks/batch_throughput.py --batch 8 --config 'ngram:min=3|chain:4+budget:4'  # batch budget
    python benchmarks/batch_throughput.py --batch 2 --num_samples 8 --system "$(cat doc.txt)"  # 16 rows

`--num_samples N` decodes N continuations of each question (B x N rows); rows sharing a prompt
prefix (a long `--system` message, the samples of one question) prefill and read it once
(`--shared_prefix auto`, the default; `docs/shared_prefix.md`). `benchmarks/shared_prefix.py`
sweeps prefix lengths with and without sharing.
"""

from __future__ import annotations

import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402
from common import cpu_model, load_avg, timed, write_json  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "Registry name, HF folder or .gguf path.")
flags.DEFINE_list("batch", ["1", "2", "4", "8", "16", "32"], "Batch sizes.")
flags.DEFINE_multi_string(
    "config", ["ngram|chain:4"], "drafter|tree (repeatable), as specdec-eval --compare."
)
flags.DEFINE_integer("max_new_tokens", 64, "Greedy tokens per row.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per (batch, method); medians reported.")
flags.DEFINE_string("mesh", None, "Device mesh, e.g. data=2,model=4 (default: one device).")
flags.DEFINE_integer("num_samples", 1, "Continuations per question (rows = batch x num_samples).")
flags.DEFINE_enum("shared_prefix", "auto", ["auto", "off"], "Share prompt prefixes among rows (Hydragen).")
flags.DEFINE_string("system", None, "System message of every prompt (default: the template's own).")
flags.DEFINE_string("out", None, "Write the results as JSON here (and a .png beside it).")


def main(argv):
    del argv
    import jax

    from specdec.chat import chat_ids
    from specdec.eval.methods import Method
    from specdec.eval.questions import load_questions
    from specdec.generate import generate, warmup
    from specdec.loading import load_model
    from specdec.sharding import device_params, parse_mesh, replicate

    mesh = parse_mesh(FLAGS.mesh)
    model = load_model(FLAGS.target, mesh=mesh)
    params, cfg = device_params(model.params, model.cfg, mesh)
    questions = load_questions("mt_bench")
    ask = lambda q: chat_ids(model.tokenizer, [{"role": "user", "content": q.turns[0]}], system=FLAGS.system)  # noqa: E731
    prompts = [ask(q) for q in questions]
    methods = {"ar": {}} | {c: Method.parse(c).build(params, cfg) for c in FLAGS.config}
    if mesh is not None:  # once, not in every timed call
        for e in methods.values():
            if "draft_params" in e:
                e["draft_params"] = replicate(e["draft_params"], mesh)
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, mesh=mesh, num_samples=FLAGS.num_samples,
              shared_prefix=FLAGS.shared_prefix)  # fmt: skip
    result = {"target": model.source, "device": str(jax.devices()[0].device_kind),
              "devices": jax.device_count(),
              "cpu": cpu_model(), "mesh": FLAGS.mesh, "max_new_tokens": FLAGS.max_new_tokens,
              "num_samples": FLAGS.num_samples, "shared_prefix": FLAGS.shared_prefix,
              "repeats": FLAGS.repeats, "load_avg_start": load_avg(), "batches": {}}  # fmt: skip
    for b in map(int, FLAGS.batch):
        batch = prompts[:b]
        for engine in methods.values():
            warmup(params, cfg, batch, **kw, **engine)
        times = {lab: [] for lab in methods}
        outs = {}
        for _ in range(FLAGS.repeats):
            for lab, engine in methods.items():
                outs[lab], sec = timed(lambda e=engine: generate(params, cfg, batch, **kw, **e))
                times[lab].append(sec)
        row = {}
        for lab in methods:
            new = sum(len(t) for t in outs[lab].tokens)
            row[lab] = {"tokens_per_s": new / statistics.median(times[lab]), "seconds": times[lab],
                        "new_tokens": new, "tau": outs[lab].tau, "steps": outs[lab].steps,
                        "shared_tokens": outs[lab].shared_tokens,
                        "identical_to_ar": outs[lab].tokens == outs["ar"].tokens}  # fmt: skip
            if lab != "ar":  # per repeat pair, then the median
                row[lab]["vs_ar"] = statistics.median(
                    (new / s) / (sum(len(t) for t in outs["ar"].tokens) / a)
                    for s, a in zip(times[lab], times["ar"], strict=True)
                )
        result["batches"][b] = row
        print(b, {lab: round(r["tokens_per_s"], 1) for lab, r in row.items()},
              {lab: round(r["vs_ar"], 2) for lab, r in row.items() if "vs_ar" in r}, flush=True)  # fmt: skip
    result["load_avg_end"] = load_avg()
    write_json(result, FLAGS.out)
    if FLAGS.out:
        plot(result, os.path.splitext(FLAGS.out)[0] + ".png")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bs = [int(b) for b in result["batches"]]
    labels = list(next(iter(result["batches"].values())))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for lab in labels:
        rows = [result["batches"][b][lab] for b in result["batches"]]
        ax1.plot(bs, [r["tokens_per_s"] for r in rows], marker="o", label=lab)
        if lab != "ar":
            ax2.plot(bs, [r["vs_ar"] for r in rows], marker="o", label=lab)
    ax2.axhline(1.0, color="gray", lw=0.8)
    for ax, y in ((ax1, "tokens/s (all rows)"), (ax2, "throughput / AR throughput")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel(y)
        ax.legend(fontsize=7)
    fig.suptitle(f"{os.path.basename(result['target'])} on {result['device']} ({result['cpu']})", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    app.run(main)
