"""Answer quality against reference answers: exact match and token F1 (SQuAD-style).

For question files whose `reference` is a list of short strings (the long-document set of
`benchmarks/longdoc_set.py`): an answer matches exactly when one reference, normalised (lower
case, punctuation and articles dropped, whitespace collapsed), appears in the normalised answer;
F1 is the best token overlap F1 over the references. The bundled MT-Bench's references are full
solutions, so `specdec-eval` reports quality only for other question files.
"""

from __future__ import annotations

import re
import statistics
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(answer: str, refs: Sequence[str]) -> float:
    a = normalise(answer)
    return float(any(normalise(r) and f" {normalise(r)} " in f" {a} " for r in refs))


def f1(answer: str, refs: Sequence[str]) -> float:
    a = normalise(answer).split()
    best = 0.0
    for r in refs:
        b = normalise(r).split()
        common = sum((Counter(a) & Counter(b)).values())
        if common:
            p, q = common / len(a), common / len(b)
            best = max(best, 2 * p * q / (p + q))
    return best


def scored(reference) -> bool:
    """Whether a question's reference is a list of strings (what quality is computed for)."""
    return isinstance(reference, list) and bool(reference) and all(isinstance(r, str) for r in reference)


def quality(answers: dict, questions) -> dict | None:
    """{"exact_match", "f1", "n"} over the scored questions (first turn's answer, every run), or None.
    `answers[run][question_id]` is the list of turn answers."""
    em, fs = [], []
    for run in answers.values():
        for q in questions:
            if scored(q.reference) and q.question_id in run:
                em.append(exact_match(run[q.question_id][0], q.reference))
                fs.append(f1(run[q.question_id][0], q.reference))
    if not em:
        return None
    return {"exact_match": statistics.fmean(em), "f1": statistics.fmean(fs), "n": len(em)}
