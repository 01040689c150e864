"""RAPID's RAG drafter: a draft model that reads a retrieved, shortened context of its own.

For a long prompt (a document and a question), the drafter reads only the chunks of the document
most relevant to the question, within a token budget, while the target reads everything. Its
drafts then cost the drafter's weights plus a short KV cache, where the target's step reads a
long one. `RagDraft` is `DraftModel` prefilled from that shortened prompt: committed token i of
the target's context sits at draft slot i - offset (offset = target prompt length - draft prompt
length), and `update` catches up on committed tokens as the draft model does.

Retrieval runs on the host before the prefill (`shorten`): the user message's last paragraph is
the query, the rest the document, split into chunks of about `chunk` tokens at paragraph and
sentence boundaries, ranked by BM25 (k1 = 1.5, b = 0.75, lower-cased word tokens) against the
query; the best chunks within `budget` tokens are kept in their original order (RAPID's recipe,
with BM25 in place of its BGE-M3 embeddings). A prompt already within the budget is not changed.

Params: `{"model": the draft model's params, "prompt": [B, T] right-padded shortened prompts,
"lengths": [B]}`; `RagDraft.params_for` fills them per request (specdec-generate and
`specdec-eval` do). Verification: any lossless verifier, or RAPID's retrieval-augmented target
distribution (`specdec.verifiers.rapid`, lossy for eta > 0).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

import jax.numpy as jnp
import numpy as np

from specdec.cache import KVCache
from specdec.context import Context
from specdec.drafters.draft_model import DraftModel
from specdec.models.llama import prefill

_WORD = re.compile(r"\w+")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def chunks(text: str, count_tokens, size: int) -> list[str]:
    """`text` split into pieces of at most ~`size` tokens: paragraphs, long ones by sentences,
    short neighbours merged."""
    pieces: list[str] = []
    for para in filter(None, (p.strip() for p in text.split("\n\n"))):
        if count_tokens(para) <= size:
            pieces.append(para)
            continue
        cur = ""
        for sent in _SENTENCE.split(para):
            if cur and count_tokens(cur + " " + sent) > size:
                pieces.append(cur)
                cur = sent
            else:
                cur = f"{cur} {sent}".strip()
        if cur:
            pieces.append(cur)
    out: list[str] = []
    for p in pieces:  # merge short neighbours up to the size
        if out and count_tokens(out[-1] + "\n\n" + p) <= size:
            out[-1] = out[-1] + "\n\n" + p
        else:
            out.append(p)
    return out


def bm25(docs: list[str], query: str, k1: float = 1.5, b: float = 0.75) -> np.ndarray:
    """BM25 scores of `docs` for `query` (lower-cased word tokens)."""
    toks = [_WORD.findall(d.lower()) for d in docs]
    q = _WORD.findall(query.lower())
    n, avg = len(toks), max(sum(map(len, toks)) / max(len(toks), 1), 1.0)
    df = Counter(w for t in toks for w in set(t))
    scores = np.zeros(n)
    for i, t in enumerate(toks):
        tf = Counter(t)
        for w in set(q):
            if tf[w]:
                idf = math.log(1 + (n - df[w] + 0.5) / (df[w] + 0.5))
                scores[i] += idf * tf[w] * (k1 + 1) / (tf[w] + k1 * (1 - b + b * len(t) / avg))
    return scores


def shorten(text: str, count_tokens, budget: int, chunk: int) -> str:
    """The retrieved context for `text` (module doc): the best chunks of the document within
    `budget` tokens, in order, then the query (the last paragraph)."""
    if count_tokens(text) <= budget:
        return text
    doc, _, query = text.rstrip().rpartition("\n\n")
    if not doc:
        return text
    pieces = chunks(doc, count_tokens, chunk)
    room = budget - count_tokens(query)
    keep = []
    for i in np.argsort(-bm25(pieces, query), kind="stable"):
        cost = count_tokens(pieces[i]) + 1
        if cost <= room:
            keep.append(i)
            room -= cost
    return "\n\n".join([pieces[i] for i in sorted(keep)] + [query])


@dataclasses.dataclass(frozen=True)
class RagDraft(DraftModel):
    """`DraftModel` over its own shortened prompt (module doc); `budget`, `chunk` in tokens."""

    budget: int = 1024
    chunk: int = 128

    def shorten_messages(self, messages: list[dict], count_tokens) -> list[dict]:
        """The conversation with its first user message shortened (the document lives there)."""
        out, done = [], False
        for m in messages:
            if m["role"] == "user" and not done:
                text = shorten(m["content"], count_tokens, self.budget, self.chunk)
                m, done = {**m, "content": text}, True
            out.append(m)
        return out

    def params_for(self, base: dict, conversations: list[list[dict]], encode, tokenizer) -> dict:
        """`base` ({"model": ...}) with each conversation's shortened prompt; `encode(messages) ->
        token ids` renders a conversation as the target's prompt is rendered."""
        count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
        return draft_params(base, [encode(self.shorten_messages(c, count)) for c in conversations])

    def init(self, params, ctx: Context, prompt, prefill_taps, cache_size: int, *, window: int):
        if "prompt" not in params:
            raise ValueError(
                "the RAG drafter needs its shortened prompts in its params: "
                "draft_params = specdec.drafters.rag.draft_params(base_params, prompts)"
            )
        rag, lens = params["prompt"], params["lengths"]
        b = rag.shape[0]
        _, _, cache = prefill(params["model"], self.cfg, rag, KVCache.init(self.cfg, b, cache_size))
        cache = cache.advance(lens)
        offset = ctx.lengths - 1 - lens  # the root (target index lengths - 1) sits at draft slot lens
        return self._catch_up(params["model"], cache, ctx, 1, None, offset)

    def begin(self, params, state, ctx):
        return super().begin(params["model"], state, ctx)

    def expand(self, params, state, ctx, tree, frontier):
        return super().expand(params["model"], state, ctx, tree, frontier)

    def update(self, params, state, ctx, tree, verdict, taps):
        return super().update(params["model"], state, ctx, tree, verdict, taps)


def draft_params(base: dict, prompts: list[list[int]], bucket: int = 256) -> dict:
    """`base` ({"model": ...}) with the shortened prompts, right-padded to a multiple of `bucket`
    (fewer shapes to compile)."""
    t = max(bucket, -(-max(map(len, prompts)) // bucket) * bucket)
    arr = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        arr[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    return {"model": base["model"], "prompt": jnp.asarray(arr), "lengths": lengths}
