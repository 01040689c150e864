"""Retrieval hit rates on the answers the target actually gives: prompt lookup vs a REST datastore.

At temperature 0 speculative decoding emits the target's greedy answer, so how often a retrieval
source could help is a property of that answer alone: for every position t of each first-turn
answer (the baseline's tokens in a `specdec-eval` run's progress.jsonl), the source looks up its
candidates for prompt + answer[:t] exactly as in decoding, and we count

  hit       the source proposes something (a suffix matched),
  useful    its best candidate's first token is answer[t] (a draft that would be accepted),
  accepted  the mean number of leading tokens of the best candidate that equal answer[t:],
  any       the same over all `--paths` candidates: the longest accepted prefix among them.

    python benchmarks/retrieval_hits.py --run runs/mtbench --datastore runs/rest/selfdistill.npz
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from common import cpu_model, write_json  # noqa: E402

from specdec.context import Context  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("run", "runs/mtbench", "A specdec-eval output folder (its progress.jsonl).")
flags.DEFINE_string("datastore", None, "A REST datastore (specdec-datastore); prompt lookup only without it.")
flags.DEFINE_integer("paths", 2, "Candidates per source.")
flags.DEFINE_integer("length", 4, "Candidate length.")
flags.DEFINE_string("out", None, "JSON to write (default: <run>/retrieval_hits.json).")


def sequences(run: pathlib.Path, tokenizer):
    """[(prompt ids, answer ids)] of every question's first turn, from the baseline's records."""
    from specdec.chat import chat_ids
    from specdec.eval.questions import load_questions

    lines = [json.loads(x) for x in (run / "progress.jsonl").read_text().splitlines() if x.strip()]
    bench = lines[0].get("config", {}).get("bench", "mt_bench")
    turns = {q.question_id: q.turns[0] for q in load_questions(bench)}
    out = []
    for rec in lines[1:]:
        for r in rec["labels"]["baseline"]["records"]:
            if r["turn"] == 0 and r["run"] == 0:
                out.append((chat_ids(tokenizer, turns[r["question_id"]]), list(r["tokens"])))
    return out


def score(source, params, seqs) -> dict:
    """Hit, useful and accepted statistics of a retrieval source's candidates (`retrieve`, its
    `retrieval = (paths, length)`) over every answer position."""
    r = source.retrieval[0]
    hit = useful = 0
    acc_best, acc_any, n = [], [], 0
    for prompt, answer in seqs:
        full = np.asarray(prompt + answer, np.int32)
        lengths = np.arange(len(prompt), len(full))  # context = full[:L], the next token is full[L]
        # the same row at every length; padded to fixed shapes so one compile serves every answer
        width = -(-len(full) // 256) * 256
        padded = np.zeros(width, np.int32)
        padded[: len(full)] = full
        rows = 128 * -(-len(lengths) // 128)
        lens = np.concatenate([lengths, np.full(rows - len(lengths), lengths[-1])])
        ctx = Context(jnp.asarray(np.broadcast_to(padded, (rows, width))), jnp.asarray(lens))
        tok, ok = (np.asarray(x) for x in source.retrieve(params, ctx))
        for i, length in enumerate(lengths):
            want = full[length : length + tok.shape[2]]
            runs = []
            for c in range(r):
                m = 0
                while m < len(want) and ok[i, c, m] and tok[i, c, m] == want[m]:
                    m += 1
                runs.append(m)
            n += 1
            hit += bool(ok[i, 0, 0])
            useful += runs[0] > 0
            acc_best.append(runs[0])
            acc_any.append(max(runs))
    return {"positions": n, "hit_rate": hit / n, "useful_rate": useful / n,
            "accepted_best": float(np.mean(acc_best)), "accepted_any": float(np.mean(acc_any))}  # fmt: skip


def main(_):
    from specdec.drafters import NGram
    from specdec.loading import load_model

    model = load_model("smollm2-135m-instruct")
    run = pathlib.Path(FLAGS.run)
    seqs = sequences(run, model.tokenizer)
    k = FLAGS.length
    out = {"run": str(run), "cpu": cpu_model(), "answers": len(seqs), "paths": FLAGS.paths, "length": k}
    for name, n_min in (("ngram", 1), ("ngram:min=2", 2)):
        src = NGram(model.cfg.vocab_size, max_depth=k, max_n=3, min_n=n_min, paths=FLAGS.paths)
        out[name] = score(src, None, seqs)
    if FLAGS.datastore:
        from specdec.drafters.rest import load_rest

        arg = f"{FLAGS.datastore},paths={FLAGS.paths},len={k}"
        rest, params = load_rest("rest", arg, model.cfg, max_depth=k)
        out["rest"] = score(rest, params, seqs)
    for name, s in out.items():
        if isinstance(s, dict):
            print(f"{name}: " + ", ".join(f"{a} {b:.3f}" if isinstance(b, float) else f"{a} {b}"
                                          for a, b in s.items()))  # fmt: skip
    write_json(out, str(FLAGS.out or run / "retrieval_hits.json"))


if __name__ == "__main__":
    app.run(main)
