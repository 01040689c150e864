"""How far a fine-tuned backbone (Medusa-2's) drifted from its original: quality, not speed.

    python benchmarks/backbone_drift.py --tuned smollm2-135m-instruct-medusa2 \
        --out docs/results/medusa2_drift.json

Two measurements, both on text the fine-tuning never saw:
- teacher-forced, on held-out self-distilled conversations (`--regenerated`, from `--skip` on: the
  shipped backbone trained on the first 640): the answer tokens' negative log-likelihood under each
  model (perplexity = exp), the mean KL(original || tuned) of the next-token distributions and the
  share of positions whose argmax agrees;
- greedy answers to MT-Bench's first turns (chat template, `--max_new_tokens`, EOS honoured): the
  share of answers identical token for token, and the mean length of the common prefix over the
  original's answer length.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # benchmarks/: `common`
from common import cpu_model, load_avg, write_json  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("base", "smollm2-135m-instruct", "The original target.")
flags.DEFINE_string("tuned", "smollm2-135m-instruct-medusa2", "The fine-tuned target (a derived target).")
flags.DEFINE_string("regenerated", "data/selfdistill/smollm2-135m-instruct", "Held-out conversations.")
flags.DEFINE_integer("skip", 5800, "Conversations of --regenerated before the held-out ones.")
flags.DEFINE_integer("sequences", 64, "Held-out conversations scored teacher-forced.")
flags.DEFINE_integer("questions", 80, "MT-Bench first turns answered greedily by both.")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens per greedy answer at most.")
flags.DEFINE_integer("batch", 16, "Prompts decoded together.")
flags.DEFINE_string("out", None, "JSON result file.")


def teacher_forced(models, examples) -> dict:
    """Per-model answer-token NLL, KL(first || second) and argmax agreement over `examples`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tqdm import tqdm

    from specdec.cache import causal_mask
    from specdec.models import forward

    @jax.jit
    def scores(pa, pb, toks, mask):
        t = toks.shape[1]
        pos, m = jnp.arange(t)[None], causal_mask(1, t)
        la = jax.nn.log_softmax(forward(pa, models[0][1], toks, pos, None, m)[0], -1)[0, :-1]
        lb = jax.nn.log_softmax(forward(pb, models[1][1], toks, pos, None, m)[0], -1)[0, :-1]
        nxt = toks[0, 1:, None]
        w = mask[0, 1:].astype(jnp.float32)
        nll = lambda lp: jnp.sum(-jnp.take_along_axis(lp, nxt, -1)[:, 0] * w)  # noqa: E731
        kl = jnp.sum(jnp.sum(jnp.exp(la) * (la - lb), -1) * w)
        agree = jnp.sum((jnp.argmax(la, -1) == jnp.argmax(lb, -1)) * w)
        return jnp.stack([nll(la), nll(lb), kl, agree, jnp.sum(w)])

    total, t = np.zeros(5), max(len(ex.tokens) for ex in examples)
    for ex in tqdm(examples, desc="teacher-forced"):  # padded to one length: one compiled program
        n = len(ex.tokens)
        toks = np.zeros((1, t), np.int32)
        mask = np.zeros((1, t), bool)
        toks[0, :n], mask[0, :n] = ex.tokens, ex.loss_mask  # (causal: padding after is never seen)
        total += np.asarray(scores(models[0][0], models[1][0], jnp.asarray(toks), jnp.asarray(mask)))
    n = total[4]
    return {"answer_tokens": int(n), "nll_base": total[0] / n, "nll_tuned": total[1] / n,
            "ppl_base": float(np.exp(total[0] / n)), "ppl_tuned": float(np.exp(total[1] / n)),
            "kl_base_tuned": total[2] / n, "argmax_agreement": total[3] / n}  # fmt: skip


def greedy_agreement(models, tokenizer, questions, max_new: int, batch: int) -> dict:
    """Identical greedy answers and the mean common-prefix share between the two models."""
    import numpy as np

    from specdec.chat import chat_ids
    from specdec.generate import generate

    prompts = [chat_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    answers = []
    for params, cfg in models:
        out = []
        for i in range(0, len(prompts), batch):
            out += generate(params, cfg, prompts[i : i + batch], max_new_tokens=max_new).tokens
        answers.append(out)
    same, share, first = [], [], []  # per answer: identical, common-prefix share, first differing token
    for a, b in zip(*answers, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        same.append(a == b)
        share.append(k / max(len(a), 1))
        first.append(k)
    mean = lambda x: float(np.mean(x))  # noqa: E731
    return {"answers": len(same), "identical": mean(same), "common_prefix_share": mean(share),
            "first_divergence_median": float(np.median(first))}  # fmt: skip


def main(argv):
    del argv
    from specdec.eval.questions import load_questions
    from specdec.loading import load_model
    from specdec.models import to_device
    from specdec.train.regenerated_set import load_exported

    loaded = [load_model(FLAGS.base), load_model(FLAGS.tuned)]
    models = [(to_device(m.params, m.cfg), m.cfg) for m in loaded]
    examples = load_exported(FLAGS.regenerated)[FLAGS.skip : FLAGS.skip + FLAGS.sequences]
    questions = [q.turns[0] for q in load_questions("mt_bench")][: FLAGS.questions]
    result = {"base": FLAGS.base, "tuned": FLAGS.tuned, "cpu": cpu_model(), "load_start": load_avg(),
              "held_out": {"regenerated": FLAGS.regenerated, "from": FLAGS.skip, "sequences": len(examples),
                           **teacher_forced(models, examples)},
              "greedy": {"questions": "mt_bench first turns", "max_new_tokens": FLAGS.max_new_tokens,
                         **greedy_agreement(models, loaded[0].tokenizer, questions, FLAGS.max_new_tokens,
                                            FLAGS.batch)}}  # fmt: skip
    write_json(result, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
