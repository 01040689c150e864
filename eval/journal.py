"""The resumable record of an evaluation: one JSON line per finished question batch."""

from __future__ import annotations

import json
import os
import pathlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the runner imports the journal; the journal only needs the config's type
    from specdec.eval.mtbench import EvalConfig


class Journal:
    """Append-only record of finished question batches (JSON lines), keyed by (run, question ids).

    Line 1 holds the configuration; a journal of another configuration is refused. A line cut off
    by a kill is dropped (that batch is rerun).
    """

    def __init__(self, path: os.PathLike, config: EvalConfig, question_ids: list, *, restart: bool = False):
        self.path = pathlib.Path(path)
        head = json.loads(json.dumps({"config": config.as_dict(), "question_ids": question_ids}))
        self.done: dict[tuple, dict] = {}
        if restart and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            old = json.loads(lines[0]) if lines else None
            if old is not None and old != head:
                diff = sorted(k for k in head["config"] if old["config"].get(k) != head["config"][k])
                raise ValueError(
                    f"{self.path} belongs to an evaluation with another configuration (differs in: "
                    f"{', '.join(diff) or 'question selection'}); use another --out, or --restart to "
                    "discard it"
                )
            good = lines[:1]
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # cut off by a kill
                    break
                self.done[(rec["run"], tuple(rec["question_ids"]))] = rec
                good.append(line)
            self.path.write_text("".join(x + "\n" for x in good), encoding="utf-8")
        if not self.path.exists() or not self.path.read_text(encoding="utf-8").strip():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(head) + "\n", encoding="utf-8")

    def append(self, rec: dict) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
