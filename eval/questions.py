"""Benchmark questions: the bundled MT-Bench file or any FastChat / Spec-Bench `question.jsonl`.

A question file has one JSON object per line:

    {"question_id": 81, "category": "writing", "turns": ["...", "..."], "reference": ["..."]}

`question_id` (int or str, unique), `category` (str), `turns` (non-empty list of str) are required.
Everything else is carried along untouched: `reference` may be any JSON (FastChat: a list of
strings; Spec-Bench's RAG questions: a list of lists), other fields land in `Question.extra`.
Blank lines are skipped. Every malformed line raises `QuestionFileError` naming the file and the
1-based line number.

Selection (`select`) is deterministic and keeps file order: categories filter, then the first N per
category, then the first `limit` overall.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib
from collections.abc import Sequence
from typing import Any

BUNDLED = {"mt_bench": "mt_bench_question.jsonl"}  # --bench name -> file in specdec/data


class QuestionFileError(ValueError):
    """A question file is missing, malformed, or the selection is invalid or empty."""


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question: a conversation of `len(turns)` user turns, asked in order."""

    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: Any = None  # any JSON value, as in the file
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)  # other fields


def bench_path(bench: str) -> pathlib.Path:
    """Path of a bundled benchmark name (`mt_bench`) or of a question file given by path."""
    if bench in BUNDLED:
        res = importlib.resources.files("specdec") / "data" / BUNDLED[bench]
        path = pathlib.Path(str(res))
        if not path.is_file():
            raise QuestionFileError(
                f"the bundled question file {path} is missing; reinstall specdec (`pip install -e .`)"
            )
        return path
    path = pathlib.Path(bench).expanduser()
    if not path.is_file():
        raise QuestionFileError(
            f"--bench {bench!r} is neither a bundled benchmark ({', '.join(sorted(BUNDLED))}) "
            "nor an existing question.jsonl file"
        )
    return path


def _parse_line(text: str, where: str) -> Question:
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise QuestionFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise QuestionFileError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    missing = [k for k in ("question_id", "category", "turns") if k not in rec]
    if missing:
        raise QuestionFileError(
            f"{where}: missing field(s) {missing}; a question needs question_id, category and turns"
        )
    qid, cat, turns = rec["question_id"], rec["category"], rec["turns"]
    if isinstance(qid, bool) or not isinstance(qid, (int, str)):
        raise QuestionFileError(f"{where}: question_id must be an int or a string, got {qid!r}")
    if not isinstance(cat, str):
        raise QuestionFileError(f"{where}: category must be a string, got {cat!r}")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) for t in turns):
        raise QuestionFileError(f"{where}: turns must be a non-empty list of strings, got {turns!r}")
    extra = {k: v for k, v in rec.items() if k not in ("question_id", "category", "turns", "reference")}
    return Question(qid, cat, tuple(turns), rec.get("reference"), extra)


def load_questions(bench: str) -> list[Question]:
    """All questions of a bundled benchmark name or a question.jsonl path, in file order."""
    path = bench_path(bench)
    out: list[Question] = []
    seen: dict[int | str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            q = _parse_line(line, where)
            if q.question_id in seen:
                raise QuestionFileError(
                    f"{where}: duplicate question_id {q.question_id!r} (first at line {seen[q.question_id]})"
                )
            seen[q.question_id] = lineno
            out.append(q)
    if not out:
        raise QuestionFileError(f"{path}: the file holds no questions")
    return out


def categories_of(questions: Sequence[Question]) -> list[str]:
    """Categories in order of first appearance."""
    return list(dict.fromkeys(q.category for q in questions))


def select(
    questions: Sequence[Question],
    *,
    categories: Sequence[str] | None = None,
    per_category: int | None = None,
    limit: int | None = None,
    source: str = "the question file",
) -> list[Question]:
    """Deterministic subset in file order: keep `categories`, then the first `per_category` of each
    category, then the first `limit` questions. None (or an empty list) = no constraint.

    Raises QuestionFileError for an unknown category (listing the valid ones), a negative count, or
    an empty result.
    """
    valid = categories_of(questions)
    if categories:
        unknown = [c for c in categories if c not in valid]
        if unknown:
            raise QuestionFileError(
                f"unknown categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in {source}; "
                f"valid categories: {', '.join(valid)}"
            )
        wanted = set(categories)
        questions = [q for q in questions if q.category in wanted]
    for name, n in (("per_category", per_category), ("limit", limit)):
        if n is not None and n < 0:
            raise QuestionFileError(f"--{name} must be >= 0, got {n}")
    if per_category is not None:
        counts: dict[str, int] = {}
        kept = []
        for q in questions:
            if counts.get(q.category, 0) < per_category:
                counts[q.category] = counts.get(q.category, 0) + 1
                kept.append(q)
        questions = kept
    if limit is not None:
        questions = list(questions)[:limit]
    if not questions:
        raise QuestionFileError(
            f"the selection from {source} is empty (categories={list(categories or []) or 'all'}, "
            f"per_category={per_category}, limit={limit}); loosen --categories / --per_category / --limit"
        )
    return list(questions)
