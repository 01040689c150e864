"""Build a long-document question set (needle in a haystack) from ShareGPT, as a specdec-eval file.

Each question is one user turn: a document of `--tokens` target tokens (4-8K; SmolLM2 reads 8,192)
made of ShareGPT assistant answers from different conversations, separated by blank lines, with
three "facts" inserted at random paragraph boundaries, e.g. "The access code of the amber
harbour vault is 48213." (the needle and two distractors of the same form, other names and
numbers), then the question "What is the access code of the amber harbour vault? Answer with the
number." The reference is the number, so answers are scored by exact match (the number appears
in the answer) and token F1 (`specdec-eval` reports both for questions whose `reference` is a
list of strings). Seeded and deterministic; Spec-Bench's questions are not used.

    python benchmarks/longdoc_set.py --out runs/longdoc/needle_6k.jsonl --tokens 6000 --n 12

Format (one JSON object per line, FastChat's question format plus fields specdec-eval ignores):
    {"question_id": "needle-6000-0", "category": "needle-6k", "turns": ["<document>\\n\\n<question>"],
     "reference": ["48213"], "document_tokens": 5987, "needle_position": 0.41}
"""

from __future__ import annotations

import json
import os
import pathlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "runs/longdoc/needle_6k.jsonl", "Question file to write.")
flags.DEFINE_integer("tokens", 6000, "Document length in target tokens (approximately, from below).")
flags.DEFINE_integer("n", 12, "Questions.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("target", "smollm2-135m-instruct", "Whose tokenizer counts the tokens.")

COLOURS = ["amber", "cobalt", "crimson", "ivory", "jade", "saffron", "silver", "umber", "violet", "teal"]
PLACES = ["harbour", "orchard", "quarry", "citadel", "archive", "lighthouse", "foundry", "observatory"]


def fact(rng) -> tuple[str, str, str]:
    """(sentence, question, answer) of one random fact."""
    name = f"{rng.choice(COLOURS)} {rng.choice(PLACES)}"
    code = str(rng.integers(10000, 100000))
    return (f"The access code of the {name} vault is {code}.",
            f"What is the access code of the {name} vault? Answer with the number.", code)  # fmt: skip


def main(_):
    from specdec.loading import load_model
    from specdec.train.data import load_sharegpt

    tok = load_model(FLAGS.target).tokenizer
    rng = np.random.default_rng(FLAGS.seed)
    convs = load_sharegpt()
    passages = [m["content"].strip() for c in convs for m in c if m["role"] == "assistant"]
    passages = [p for p in passages if 300 <= len(p) <= 4000 and "vault" not in p]
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(FLAGS.n):
        facts = []
        while len({f[1] for f in facts}) < 3:  # the needle and two distractors, all different
            facts = [fact(rng) for _ in range(3)]
        paras, total = [], 0
        for j in rng.permutation(len(passages)):
            n = len(tok.encode(passages[j], add_special_tokens=False))
            if total + n > FLAGS.tokens - 120:
                if total > FLAGS.tokens * 0.8:
                    break
                continue
            paras.append(passages[j])
            total += n + 1
        for sentence, _, _ in facts:
            paras.insert(int(rng.integers(0, len(paras) + 1)), sentence)
        needle, question, answer = facts[0]
        doc = "\n\n".join(paras)
        lines.append({
            "question_id": f"needle-{FLAGS.tokens}-{i}", "category": f"needle-{FLAGS.tokens // 1000}k",
            "turns": [f"{doc}\n\n{question}"], "reference": [answer],
            "document_tokens": len(tok.encode(doc, add_special_tokens=False)),
            "needle_position": round(doc.index(needle) / len(doc), 2),
        })  # fmt: skip
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    print(f"{len(lines)} questions, documents of {[x['document_tokens'] for x in lines]} tokens -> {out}")


if __name__ == "__main__":
    app.run(main)
