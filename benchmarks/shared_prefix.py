"""Shared prompt prefixes (Hydragen) at batch 1-32 and prefixes of 512-6K tokens: throughput, prefill
time, KV bytes per step and peak memory, with and without sharing, AR and speculative.

The workload: one long document (ShareGPT conversations, the training corpus) as the system
message, then a different MT-Bench question per row, greedy, `--max_new_tokens` each — the "many
questions about one document" shape. With `shared_prefix="auto"` the rows' common prefix (the
system turn) is prefilled once and attention reads it once per step for all rows; "off" gives
every row its own copy (B prefills of it, B copies read per step). Each point runs in its own
process (its peak resident memory is the process's), compiled first, then timed `--repeats` times
(medians). Points are appended to `--out` (JSON lines) as they finish; a rerun skips the points
already there, so a long sweep resumes where it stopped.

    python benchmarks/shared_prefix.py --out runs/shared_prefix.jsonl --plot docs/results/shared_prefix.png
    python benchmarks/shared_prefix.py --batches 16 --prefixes 1024,4096,6144 --modes ar --out ...

Unshared runs prefill the prefix once per row: `--unshared_budget` (batch x prefix tokens) bounds
which points run them (the default covers batch 16 at 6K); the others are left out and said so.

Physics beside the measurement: a step reads the weights once and, per row, the KV of every
token it attends; KV bytes/token = 2 x layers x KV heads x head dim x 4 bytes. Unshared: B x
(prefix + own) tokens per step; shared: one prefix per group + B x own.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "Registry name, HF folder or .gguf path.")
flags.DEFINE_list("batches", ["1", "4", "16", "32"], "Batch sizes (rows = questions).")
flags.DEFINE_list("prefixes", ["512", "1024", "2048", "4096", "6144"], "Shared prefix lengths (tokens).")
flags.DEFINE_list("modes", ["ar", "ngram", "eagle"], "ar, ngram (chain:4), eagle (the shipped EAGLE).")
flags.DEFINE_list("sharing", ["auto", "off"], "shared_prefix settings to run.")
flags.DEFINE_integer("max_new_tokens", 128, "Greedy tokens per row.")
flags.DEFINE_integer("repeats", 1, "Timed repeats per point (medians).")
flags.DEFINE_integer("unshared_budget", 16 * 6144, "Run unshared points only up to batch x prefix tokens.")
flags.DEFINE_string("out", "runs/shared_prefix.jsonl", "Results, one JSON line per point (resumable).")
flags.DEFINE_string("plot", None, "Write a plot of the results here.")
flags.DEFINE_string("point", None, "internal: run one point 'batch,prefix,mode,sharing' and print JSON")

METHODS = {"ar": None, "ngram": "ngram|chain:4", "eagle": "eagle|dynamic:depth=2,topk=3,n=4"}


def document(tokenizer, n: int) -> str:
    """About `n` tokens of ShareGPT text (conversations joined), cut at a token boundary."""
    from specdec.train.data import load_sharegpt

    parts, have = [], 0
    for conv in load_sharegpt():
        for turn in conv:
            text = turn["content"] if isinstance(turn, dict) else str(turn)
            parts.append(text)
            have += len(text) // 3
        if have > 2 * n:
            break
    ids = tokenizer.encode("\n\n".join(parts), add_special_tokens=False)[:n]
    return tokenizer.decode(ids)


def run_point(batch: int, prefix: int, mode: str, sharing: str) -> dict:
    """One measurement, in this process."""
    import jax
    from common import cpu_model, load_avg

    from specdec.chat import chat_ids
    from specdec.eval.methods import Method
    from specdec.eval.questions import load_questions
    from specdec.generate import generate, warmup
    from specdec.loading import load_model
    from specdec.models import to_device
    from specdec.prefix_sharing import plan_sharing

    model = load_model(FLAGS.target)
    cfg = model.cfg.replace(eos_token_ids=())  # every row decodes all its tokens: equal work per row
    params = to_device(model.params, cfg)
    tok = model.tokenizer
    # the system turn as the shared prefix: the document sized so that the prefix is ~`prefix` tokens
    head = len(chat_ids(tok, [{"role": "user", "content": "x"}], system="x"))
    doc = document(tok, prefix - head + 8)
    qs = [q.turns[0] for q in load_questions("mt_bench")]
    prompts = [
        chat_ids(tok, [{"role": "user", "content": qs[i % len(qs)]}], system=doc) for i in range(batch)
    ]
    engine = {} if METHODS[mode] is None else Method.parse(METHODS[mode]).build(params, cfg)
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, shared_prefix=sharing, **engine)
    t0 = time.perf_counter()
    warmup(params, cfg, prompts, **kw)
    compile_s = time.perf_counter() - t0
    load = load_avg()
    walls, outs = [], []
    for _ in range(FLAGS.repeats):
        t0 = time.perf_counter()
        outs.append(generate(params, cfg, prompts, **kw))
        walls.append(time.perf_counter() - t0)
    out = outs[-1]
    wall, pre = statistics.median(walls), statistics.median(o.prefill_seconds for o in outs)
    new = sum(len(t) for t in out.tokens)
    plan = plan_sharing(prompts)
    shared = plan.lengths[0][0] if plan is not None else 0  # one level over all rows
    own = statistics.mean(len(p) for p in prompts) - shared + FLAGS.max_new_tokens / 2  # mean own tokens
    kv_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    kv_step = (shared + batch * own if sharing == "auto" and plan else batch * (shared + own)) * kv_token
    return {
        "batch": batch, "prefix": prefix, "mode": mode, "sharing": sharing, "shared_tokens": shared,
        "prompt_tokens": [len(p) for p in prompts], "new_tokens": new, "seconds": walls,
        "prefill_seconds": pre, "tokens_per_s": new / wall, "decode_tokens_per_s": new / (wall - pre),
        "tau": out.tau, "steps": out.steps, "compile_seconds": compile_s, "kv_bytes_per_step": kv_step,
        "weight_bytes": weights, "tokens": out.tokens, "cpu": cpu_model(), "load_before": load,
        "load_after": load_avg(), "target": str(model.source),
    }  # fmt: skip


def main(argv):
    del argv
    if FLAGS.point:
        b, p, mode, sharing = FLAGS.point.split(",")
        print("RESULT " + json.dumps(run_point(int(b), int(p), mode, sharing)), flush=True)
        return
    done = set()
    if os.path.exists(FLAGS.out):
        for line in open(FLAGS.out, encoding="utf-8"):
            r = json.loads(line)
            done.add((r["batch"], r["prefix"], r["mode"], r["sharing"]))
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    points = [(int(b), int(p), m, s) for m in FLAGS.modes for b in FLAGS.batches for p in FLAGS.prefixes
              for s in FLAGS.sharing]  # fmt: skip
    skipped = [pt for pt in points if pt[3] == "off" and pt[0] * pt[1] > FLAGS.unshared_budget]
    if skipped:
        print(f"left out (unshared, batch x prefix > {FLAGS.unshared_budget}): {skipped}", flush=True)
    from tqdm import tqdm

    todo = [pt for pt in points if pt not in done and pt not in skipped]
    for pt in tqdm(todo, desc="points"):
        args = [sys.executable, __file__, f"--point={','.join(map(str, pt))}", f"--target={FLAGS.target}",
                f"--max_new_tokens={FLAGS.max_new_tokens}", f"--repeats={FLAGS.repeats}"]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        stdout = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
        if status or line is None:
            print(f"point {pt} failed (status {status})", flush=True)
            continue
        rec = json.loads(line[len("RESULT ") :]) | {"peak_rss_bytes": usage.ru_maxrss * 1024}
        with open(FLAGS.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
        rate, pre = f"{rec['tokens_per_s']:.1f}", f"{rec['prefill_seconds']:.1f}"
        tqdm.write(f"{pt}: {rate} tok/s (decode {rec['decode_tokens_per_s']:.1f}), prefill {pre} s, "
                   f"peak {rec['peak_rss_bytes'] / 2**30:.2f} GiB")  # fmt: skip
    if FLAGS.plot:
        plot(FLAGS.out, FLAGS.plot)


def plot(results: str, path: str) -> None:
    """Decode tokens/s against the prefix, per batch and mode, with (solid) and without (dashed) sharing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(x) for x in open(results, encoding="utf-8")]
    modes = sorted({r["mode"] for r in rows}, key=list(METHODS).index)
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes, strict=True):
        for b in sorted({r["batch"] for r in rows if r["mode"] == mode}):
            for sharing, style in (("auto", "-"), ("off", "--")):
                same = lambda r: (r["mode"], r["batch"], r["sharing"]) == (mode, b, sharing)  # noqa: E731
                pts = sorted((r["prefix"], r["decode_tokens_per_s"]) for r in rows if same(r))
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker="o", label=f"B={b} {sharing}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("shared prefix (tokens)")
        ax.set_ylabel("decode tokens/s (all rows)")
        ax.set_title(mode)
        ax.legend(fontsize=6)
    fig.suptitle(f"shared prefixes: {rows[0]['target'].split('/')[-1]} on {rows[0]['cpu']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    app.run(main)
