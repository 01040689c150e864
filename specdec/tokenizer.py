"""Build a Hugging Face fast tokenizer from a GGUF file's tokenizer metadata, without torch.

transformers can read a GGUF tokenizer itself (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`), but that
path imports torch, which the specdec runtime does not have. The metadata holds everything a byte-level BPE
needs (`tokenizer.ggml.tokens`, `.merges`, `.token_type`, special ids, `.pre`), so we assemble the
`tokenizers` pipeline directly and wrap it in `transformers.PreTrainedTokenizerFast`.

Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Llama 3, Qwen2, Mistral Tekken)
are supported; sentencepiece vocabularies (`"llama"`) raise `UnsupportedModelError`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from specdec.models.config import UnsupportedModelError

# llama.cpp token types (enum llama_token_type).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None]:
    """(pre-tokenizer, normalizer) reproducing the HF `tokenizer.json` that llama.cpp labelled `pre`.

    llama.cpp names a pre-tokenizer by hashing the HF tokenizer's output at conversion time, so each name maps
    to one HF pipeline. "smollm" is llama.cpp's `\\p{N}` split followed by the GPT-2 regex, i.e. HF's
    `Sequence([Digits(individual_digits=True), ByteLevel(use_regex=True)])` (SmolLM2's real tokenizer.json).
    """
    if pre == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None
    if pre == "smollm":
        return (
            pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                ]
            ),
            None,
        )
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        return _split_then_bytes(_LLAMA3_SPLIT), None
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _split_then_bytes(_QWEN2_SPLIT), normalizers.NFC()  # Qwen2's tokenizer.json NFC-normalizes
    if pre == "tekken":
        return _split_then_bytes(_TEKKEN_SPLIT), None
    raise UnsupportedModelError(
        f"GGUF tokenizer pre-tokenizer tokenizer.ggml.pre={pre!r} is not supported (supported: gpt-2, "
        "smollm, llama-bpe, qwen2, deepseek-r1-qwen, tekken). Load the model's HF checkpoint folder "
        "instead, whose tokenizer.json describes the pre-tokenizer exactly, or add the pattern to "
        "specdec/tokenizer.py."
    )


@functools.cache
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet byte-level BPE vocabularies use)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def build_gguf_tokenizer(meta: Mapping[str, Any]) -> transformers.PreTrainedTokenizerFast:
    """A fast tokenizer from GGUF metadata (`{key: value}` as read by `gguf.GGUFReader`).

    Invariants: token ids equal the GGUF vocabulary indices (`len(tokenizer) == len(tokens)`; nothing is
    appended); CONTROL tokens (type 3) are special tokens matched whole in text; USER_DEFINED tokens (type 4)
    are matched whole but are not special (as in HF and transformers' GGUF converter); BOS/EOS are
    prepended/appended only where the file's `add_bos_token`/`add_eos_token` say so; `chat_template` comes
    from `tokenizer.chat_template`. Raises `UnsupportedModelError` for non-byte-level vocabularies or unknown
    pre-tokenizers, `KeyError` when a required key is missing.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model tokenizer.ggml.model={kind!r} is not supported; specdec builds "
            "byte-level BPE ('gpt2') tokenizers from GGUF metadata (SmolLM2, Llama 3, Qwen2). Load the "
            "model's HF checkpoint folder (with tokenizer.json) instead."
        )
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    merges: list[str] = list(meta["tokenizer.ggml.merges"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))

    # Byte-level vocabularies spell every token in the GPT-2 byte alphabet; a few files store some tokens as
    # raw
    # UTF-8 instead, which we respell so the BPE model finds them (what transformers' converter does too).
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pairs = []
    for m in merges:
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges (expected 'left right')")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    pre, norm = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "gpt-2")))
    tok.pre_tokenizer = pre
    if norm is not None:
        tok.normalizer = norm
    tok.decoder = decoders.ByteLevel()

    # Control tokens with characters outside the byte alphabet are llama.cpp mislabels; adding them would grow
    # the vocabulary past the embedding size, so they are skipped (as transformers does).
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_TYPE_CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty == TOKEN_TYPE_USER_DEFINED and t in vocab
    ]
    tok.add_special_tokens(control)
    tok.add_tokens(user)

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    out = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos_token_id"),
        eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"),
        pad_token=special("padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,  # llama.cpp: tokenizer_clean_spaces = false for these vocabs
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        out.chat_template = str(template)
    return out
