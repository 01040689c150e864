"""Host bookkeeping of one conversation being regenerated (`regenerate.py`): which tokens a slot
prefills next (the user turns and template markers up to the next generation prompt, after closing
the answer just written) and how a turn ends. Pure Python over token lists; the device calls are in
`regen_steps.py`.

Invariant: a conversation's tokens are exactly its chat-template rendering, so the template must be
prefix-stable (rendering more messages only appends); a template that is not is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from specdec.train.data import _ids

Conversation = Sequence[dict[str, str]]
_FROM = {"user": "human", "assistant": "gpt", "system": "system"}


def turn_tail(tokenizer) -> list[int]:
    """The template's tokens after an assistant turn's content (ChatML: `<|im_end|>`, `\\n`)."""
    user, bot = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}
    head, full = _ids(tokenizer, [user], True), _ids(tokenizer, [user, bot], False)
    y = tokenizer.encode("y", add_special_tokens=False)
    if full[: len(head)] != head or full[len(head) : len(head) + len(y)] != y:
        raise ValueError("the chat template is not prefix-stable; fused regeneration cannot use it")
    return full[len(head) + len(y) :]


@dataclasses.dataclass
class Flight:
    """Host bookkeeping of one conversation being regenerated in a slot."""

    index: int
    src: Conversation
    msgs: list[dict[str, str]] = dataclasses.field(default_factory=list)
    pos: int = 0  # next source message to copy or regenerate
    ids: list[int] = dataclasses.field(default_factory=list)  # tokens in the slot's cache
    mask: list[bool] = dataclasses.field(default_factory=list)
    top1: list[int] = dataclasses.field(default_factory=list)
    taps: list[np.ndarray] = dataclasses.field(default_factory=list)  # [n, n_taps, D] chunks
    gen: list[int] = dataclasses.field(default_factory=list)  # the current answer's tokens
    turns: list[dict] = dataclasses.field(default_factory=list)
    pending: int = -1  # sampled, not yet fed
    delta: tuple[list[int], list[bool]] | None = None  # tokens to prefill next
    last: bool = False  # the conversation ends after this prefill

    def record(self) -> dict:
        turns = [{"from": _FROM.get(m["role"], m["role"]), "value": m["content"]} for m in self.msgs]
        return {"id": f"regen-{self.index}", "index": self.index, "conversations": turns,
                "turns": self.turns}  # fmt: skip


def next_prompt(f: Flight, tok, tail: list[int], max_len: int, first: bool) -> None:
    """Set `f.delta` to the tokens up to the next assistant turn's generation prompt (or the
    template's turn tail only, when the conversation is over or no answer fits in `max_len`)."""
    rendered = _ids(tok, f.msgs, False) if f.msgs else []
    while f.pos < len(f.src) and f.src[f.pos]["role"] != "assistant":
        f.msgs.append(dict(f.src[f.pos]))
        f.pos += 1
    close, close_mask = [], []
    if not first:  # close the answer just written: the template's tail
        stopped = f.turns[-1]["finish"] == "eos"
        close = tail
        close_mask = [stopped] * len(close)
        if tail and rendered[-len(tail) :] != tail:
            raise ValueError("the chat template's turn ending changed with the content")
    fit = max_len - len(f.ids)
    if f.pos >= len(f.src):  # no assistant turn left
        f.delta, f.last = (close[:fit], close_mask[:fit]), True
        return
    nxt = _ids(tok, f.msgs, True)
    if rendered and nxt[: len(rendered)] != rendered:
        raise ValueError("the chat template is not prefix-stable; fused regeneration cannot use it")
    prompt = close + nxt[len(rendered) :]
    if len(prompt) >= fit:  # no room for an answer: close the last one and stop
        f.delta, f.last = (close[:fit], close_mask[:fit]), True
        return
    f.delta, f.last = (prompt, close_mask + [False] * (len(prompt) - len(close))), False


def end_turn(f: Flight, finish: str, tok, eos: set[int], tail: list[int], max_len: int) -> None:
    """Close the answer being written (`finish`: eos, length, max_len) and queue the next prompt."""
    text = tok.decode([t for t in f.gen if t not in eos], skip_special_tokens=True).strip()
    f.msgs.append({"role": "assistant", "content": text})
    f.turns.append({"tokens": len(f.gen), "finish": finish})
    f.pos += 1
    f.gen = []
    if not text:  # an empty answer ends the conversation (templates drop empty turns)
        f.msgs.pop()
        f.turns[-1]["finish"] = "empty"
        f.delta, f.last = ([], []), True
        return
    next_prompt(f, tok, tail, max_len, first=False)
