"""Prompts to token ids through the tokenizer's own chat template, and `chat`: text in, text out."""

from __future__ import annotations

from collections.abc import Sequence

Message = dict[str, str]


def chat_ids(tokenizer, conversation: str | Sequence[Message], *, system: str | None = None) -> list[int]:
    """Token ids of a chat ending with the assistant's turn opened (add_generation_prompt).

    `conversation` is one user message or a list of {"role", "content"} messages; `system`, when
    given, is prepended (otherwise the template's default applies: SmolLM2's injects one).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat template; pass raw text instead (specdec-generate --raw)"
        )
    messages = (
        [{"role": "user", "content": conversation}] if isinstance(conversation, str) else list(conversation)
    )
    if system is not None:
        messages = [{"role": "system", "content": system}] + messages
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    # transformers 5 returns a BatchEncoding, 4.x a list of ids.
    ids = enc["input_ids"] if hasattr(enc, "keys") else enc
    return [int(i) for i in ids]


def raw_ids(tokenizer, text: str) -> list[int]:
    """Plain-text prompt ids (the tokenizer's own special-token convention, e.g. a BOS)."""
    return [int(i) for i in tokenizer(text)["input_ids"]]


def chat(model, conversation: str | Sequence[Message], *, max_new_tokens: int = 256, speculator=None,
         sampling=None, system: str | None = None, seed: int = 0) -> str:  # fmt: skip
    """The assistant's reply to `conversation` (one user message or a list of messages) from
    `model` (`specdec.load`), speculative when a `speculator` (`specdec.speculator`) is given."""
    from specdec.generate import generate
    from specdec.sampling import SamplingConfig

    ids = chat_ids(model.tokenizer, conversation, system=system)
    out = generate(model.params, model.cfg, [ids], max_new_tokens=max_new_tokens, speculator=speculator,
                   sampling=sampling or SamplingConfig(), seed=seed)  # fmt: skip
    return model.tokenizer.decode(out.tokens[0], skip_special_tokens=True)
