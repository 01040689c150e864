"""REST: retrieval from a datastore of token n-grams, looked up on device.

A datastore holds, for every n-gram (n from `min_n` to `max_n`) seen in a token corpus, up to
`paths` continuations of up to `length` tokens, the ones with the most expected accepted tokens:
a continuation c of key k scores sum_j count(k + c[:j]) / count(k) over its prefixes, and it is
cut where a prefix occurred fewer than `min_count` times (REST's high-frequency prefixes; keys
whose every continuation is cut are dropped); a cut continuation that is a prefix of another is
never stored (it is dominated). Counts are of distinct windows (key + `length` tokens) per
document, so a document that loops on a phrase counts it once. Built on the host by `build` (the command is
`specdec-datastore`), stored as one `.npz` (keys and continuations as uint16 when the vocabulary
fits, else int32, compressed).

On device the keys of each n are a sorted [M, n] int32 table; a lookup binary-searches the row's
last n tokens (exact lexicographic comparison: no hash collisions), longest n first, in
ceil(log2 M) + 1 vectorized steps, and gathers the continuations. `Rest` is n-gram lookup
(`specdec.drafters.ngram.NGram`) answered from the datastore: alone it drafts its best
continuation (`--drafter rest:DS`), as a retrieval source (`eagle+rest:DS`) it gives `paths`
candidates. Params: `{"keys{n}": [M, n], "conts{n}": [M, paths, length]}` (-1 = no token).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Int

from specdec.context import Context
from specdec.drafters.ngram import NGram

FORMAT = "specdec-rest-1"
_TOP = np.iinfo(np.int32).max  # a sentinel key above every real one: a search always lands in range


@dataclasses.dataclass(frozen=True)
class DatastoreInfo:
    min_n: int
    max_n: int
    length: int
    paths: int
    min_count: int
    vocab_size: int
    corpus_tokens: int
    source: str
    build_seconds: float = 0.0


def _windows(docs, n: int, length: int) -> np.ndarray:
    """Every n-gram with the `length` tokens after it (-1 past a document's end), each distinct one
    once per document (a document that loops on a phrase counts it once): [P, n + length]."""
    out = []
    for doc in docs:
        doc = np.asarray(doc, np.int64)
        if len(doc) <= n:
            continue
        padded = np.concatenate([doc, np.full(length, -1)])
        idx = np.arange(len(doc) - n)[:, None] + np.arange(n + length)[None, :]
        out.append(np.unique(padded[idx], axis=0))
    return np.concatenate(out) if out else np.zeros((0, n + length), np.int64)


def _table(w: np.ndarray, n: int, length: int, paths: int, min_count: int):
    """(keys [M, n], continuations [M, paths, length]) from the windows `w` (module doc)."""
    if not len(w):
        return np.zeros((0, n), np.int64), np.zeros((0, paths, length), np.int64)
    w = w[np.lexsort(w.T[::-1])]  # lexicographic: every prefix's occurrences are contiguous
    diff = np.concatenate([np.ones((1, w.shape[1]), bool), w[1:] != w[:-1]])
    first_diff = np.where(diff.any(1), diff.argmax(1), w.shape[1])  # first column that changed
    groups, prefix_count = [], []  # per prefix length n + j: group ids, occurrences of the row's prefix
    for j in range(length + 1):
        gid = np.cumsum(first_diff < n + j) - 1
        groups.append(gid)
        prefix_count.append(np.bincount(gid)[gid])
    pc = np.stack(prefix_count, 1)
    ok = (w[:, n:] >= 0) & (pc[:, 1:] >= min_count)  # prefix-closed: counts only fall with j
    score = (pc[:, 1:] * ok).sum(1) / pc[:, 0]
    cut = ok.sum(1)
    # a cut path that is a proper prefix of another one of its key scores less: never a candidate
    covered = np.zeros(len(w), bool)
    for j in range(1, length + 1):
        longest = np.zeros(groups[j][-1] + 1, np.int64)
        np.maximum.at(longest, groups[j], cut)
        covered |= (cut == j) & (longest[groups[j]] > j)
    kid = groups[0]
    cont = np.where(ok, w[:, n:], -1)  # each occurrence's continuation, cut
    sel = np.flatnonzero((cut > 0) & ~covered)
    _, first = np.unique(np.concatenate([kid[sel, None], cont[sel]], 1), axis=0, return_index=True)
    sel = sel[first]  # one row per distinct (key, cut continuation)
    sel = sel[np.lexsort((-score[sel], kid[sel]))]  # by key, best first
    rank = np.arange(len(sel)) - np.searchsorted(kid[sel], kid[sel])
    sel, rank = sel[rank < paths], rank[rank < paths]
    keys_used, slot = np.unique(kid[sel], return_inverse=True)
    keys = w[np.flatnonzero(first_diff < n)[keys_used], :n]
    conts = np.full((len(keys_used), paths, length), -1, np.int64)
    conts[slot, rank] = cont[sel]
    return keys, conts


def build(
    docs, *, min_n: int = 2, max_n: int = 4, length: int = 8, paths: int = 4, min_count: int = 2,
    vocab_size: int, source: str = "", progress=None,
) -> tuple[dict[str, np.ndarray], DatastoreInfo]:  # fmt: skip
    """A datastore over `docs` (token id sequences): (tables, info); see the module doc."""
    if not 1 <= min_n <= max_n or length < 1 or paths < 1 or min_count < 1:
        raise ValueError("need 1 <= min_n <= max_n, length >= 1, paths >= 1, min_count >= 1")
    tables = {}
    for n in range(min_n, max_n + 1):
        keys, conts = _table(_windows(docs, n, length), n, length, paths, min_count)
        tables[f"keys{n}"], tables[f"conts{n}"] = keys, conts
        if progress is not None:
            progress(n, len(keys))
    info = DatastoreInfo(min_n, max_n, length, paths, min_count, vocab_size,
                         int(sum(len(d) for d in docs)), source)  # fmt: skip
    return tables, info


def save(path: os.PathLike, tables: dict[str, np.ndarray], info: DatastoreInfo) -> int:
    """Write the datastore; returns its size in bytes."""
    dtype = np.uint16 if info.vocab_size <= 65535 else np.int32  # 65535 = "no token" in uint16
    packed = {k: np.where(v < 0, np.iinfo(dtype).max if dtype == np.uint16 else -1, v).astype(dtype)
              for k, v in tables.items()}  # fmt: skip
    meta = json.dumps({"format": FORMAT, **dataclasses.asdict(info)})
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, meta=np.frombuffer(meta.encode(), np.uint8), **packed)
    os.replace(tmp, path)
    return path.stat().st_size


def load(path: os.PathLike) -> tuple[dict[str, np.ndarray], DatastoreInfo]:
    """(tables as int32 with -1 = no token, info); ValueError naming the problem otherwise."""
    try:
        z = np.load(path)
        meta = json.loads(bytes(z["meta"]).decode())
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(
            f"{path} is not a specdec datastore ({e}); build one with specdec-datastore"
        ) from None
    if meta.pop("format", None) != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} datastore; rebuild it with specdec-datastore")
    info = DatastoreInfo(**meta)
    tables = {}
    for k in z.files:
        if k == "meta":
            continue
        v = z[k].astype(np.int64)
        if z[k].dtype == np.uint16:
            v[v == np.iinfo(np.uint16).max] = -1
        tables[k] = v.astype(np.int32)
    return tables, info


def device_tables(tables: dict[str, np.ndarray]) -> dict[str, Array]:
    """The tables as device arrays, each key table ending in a sentinel row (always a search hit
    position; never equal to a real key)."""
    out = {}
    for k, v in tables.items():
        if k.startswith("keys"):
            v = np.concatenate([v, np.full((1, v.shape[1]), _TOP, np.int32)])
        else:
            v = np.concatenate([v, np.full((1,) + v.shape[1:], -1, np.int32)])
        out[k] = jnp.asarray(v, jnp.int32)
    return out


def search(keys: Int[Array, "M n"], query: Int[Array, "B n"]) -> Int[Array, " B"]:
    """Per row, the first index i with keys[i] >= query (lexicographic); keys sorted, last row the
    sentinel."""
    m = keys.shape[0]

    def less(a, q):  # a < q lexicographically, per row
        diff = a != q
        first = jnp.argmax(diff, axis=1)
        at = lambda x: jnp.take_along_axis(x, first[:, None], axis=1)[:, 0]  # noqa: E731
        return jnp.any(diff, axis=1) & (at(a) < at(q))

    def step(_, lohi):
        lo, hi = lohi
        mid = (lo + hi) // 2
        go_right = less(keys[mid], query) & (lo < hi)
        return jnp.where(go_right, mid + 1, lo), jnp.where(go_right | (lo >= hi), hi, mid)

    b = query.shape[0]
    lo, _ = jax.lax.fori_loop(0, max(1, math.ceil(math.log2(m)) + 1), step,
                              (jnp.zeros((b,), jnp.int32), jnp.full((b,), m - 1, jnp.int32)))  # fmt: skip
    return lo


@dataclasses.dataclass(frozen=True)
class Rest(NGram):
    """n-gram lookup answered from a datastore (params: `device_tables`); `max_n`, `min_n` are the
    datastore's n range used, `max_depth` the continuation length used, `paths` the candidates."""

    @property
    def fallback(self) -> str:
        skip = "runs as a plain AR step" if self.adaptive else "verifies a full tree (adaptive=0)"
        return (
            f"REST datastore: a row whose last {self.min_n}..{self.max_n} tokens are not in the datastore "
            f"drafts nothing useful that step (uniform draft logits, verified losslessly); a step without "
            f"a hit in any row {skip}"
        )

    def candidates(self, ctx: Context, r: int, params=None):
        """Up to r continuations of the longest suffix in the datastore: (tokens [B, r, max_depth],
        ok [B, r, max_depth], matched n [B, r], 0 = none)."""
        b = ctx.lengths.shape[0]
        k = self.max_depth
        tokens = jnp.zeros((b, r, k), jnp.int32)
        ok = jnp.zeros((b, r, k), bool)
        match_n = jnp.zeros((b,), jnp.int32)
        for n in range(self.min_n, self.max_n + 1):  # longer matches overwrite shorter ones
            keys, conts = params[f"keys{n}"], params[f"conts{n}"]
            idx = jnp.maximum(ctx.lengths[:, None] - n + jnp.arange(n), 0)
            query = jnp.take_along_axis(ctx.tokens, idx, axis=1)
            at = search(keys, query)
            hit = jnp.all(keys[at] == query, axis=1) & (ctx.lengths >= n)
            got = conts[at][:, :r, :k]  # [B, r', k'] (a datastore may hold fewer)
            got = jnp.pad(got, ((0, 0), (0, r - got.shape[1]), (0, k - got.shape[2])), constant_values=-1)
            tokens = jnp.where(hit[:, None, None], jnp.maximum(got, 0), tokens)
            ok = jnp.where(hit[:, None, None], got >= 0, ok)
            match_n = jnp.where(hit, n, match_n)
        return tokens, ok, match_n[:, None] * ok[:, :, 0]

    def lookup(self, params, ctx: Context):
        tokens, ok, n = self.candidates(ctx, 1, params)
        return tokens[:, 0], ok[:, 0], n[:, 0]

    def retrieve(self, params, ctx: Context):
        tokens, ok, _ = self.candidates(ctx, self.paths, params)
        return tokens, ok


def load_rest(spec: str, arg: str, target_cfg, *, max_depth: int, standalone: bool = False):
    """(Rest, device tables) for `rest:PATH[,paths=R,len=L,n=N,min=M]`; ValueError naming the fix."""
    path, *opts = arg.split(",")
    usage = "rest:DATASTORE.npz[,paths=2,len=4,n=4,min=2]"
    if not path:
        raise ValueError(
            f"--drafter {spec!r}: name the datastore, {usage} (build one with specdec-datastore)"
        )
    tables, info = load(path)
    if info.vocab_size != target_cfg.vocab_size:
        raise ValueError(
            f"--drafter {spec!r}: the datastore {path} was built for a vocabulary of {info.vocab_size} "
            f"tokens, the target has {target_cfg.vocab_size}; build one with the target's tokenizer"
        )
    kw = {}
    for o in opts:
        k, eq, v = o.partition("=")
        if not eq or k.strip() not in ("paths", "len", "n", "min") or not v.strip().isdigit():
            raise ValueError(f"--drafter {spec!r}: bad option {o!r}; use {usage}")
        kw[k.strip()] = int(v)
    length = kw.get("len", max_depth if standalone else max(max_depth, 4))
    paths, max_n, min_n = (
        kw.get("paths", min(2, info.paths)),
        kw.get("n", info.max_n),
        kw.get("min", info.min_n),
    )
    if not (
        1 <= paths <= info.paths and 1 <= length <= info.length and info.min_n <= min_n <= max_n <= info.max_n
    ):
        raise ValueError(
            f"--drafter {spec!r}: the datastore holds n = {info.min_n}..{info.max_n}, {info.paths} paths "
            f"of {info.length} tokens; ask for at most that (paths={paths}, len={length}, n={max_n}, "
            f"min={min_n})"
        )
    tables = {
        k: v for k, v in tables.items() if min_n <= int(k.removeprefix("keys").removeprefix("conts")) <= max_n
    }
    # only what is used goes to the device: `paths` continuations of `len` tokens
    tables = {k: v[:, :paths, :length] if k.startswith("conts") else v for k, v in tables.items()}
    d = Rest(target_cfg.vocab_size, max_depth=length, max_n=max_n, min_n=min_n, paths=paths)
    return d, device_tables(tables)
