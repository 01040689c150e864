"""REST datastore: built tables and device lookups equal a brute-force search over a small corpus;
the file round-trips; a bad datastore is refused in one line."""

from __future__ import annotations

from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.context import Context
from specdec.drafters import rest


def brute(docs, ctx: list[int], min_n, max_n, length, paths, min_count):
    """[(continuation tuple, n, score)] of the longest suffix of `ctx` with a kept continuation,
    best first (module doc of specdec.drafters.rest)."""
    for n in range(max_n, min_n - 1, -1):
        if len(ctx) < n:
            continue
        key = tuple(ctx[-n:])
        occ = set()  # (document, continuation): each distinct window once per document
        for i, d in enumerate(docs):
            for s in range(len(d) - n):
                if tuple(d[s : s + n]) == key:
                    occ.add((i, tuple(d[s + n : s + n + length])))
        if not occ:
            continue
        pref = Counter(c[:j] for _, c in occ for j in range(1, len(c) + 1))
        cut = set()
        for _, c in occ:
            j = 0
            while j < len(c) and pref[c[: j + 1]] >= min_count:
                j += 1
            if j:
                cut.add(c[:j])
        cut = {c for c in cut if not any(len(o) > len(c) and o[: len(c)] == c for o in cut)}  # prefixes
        if not cut:
            continue
        score = {c: sum(pref[c[:j]] for j in range(1, len(c) + 1)) / len(occ) for c in cut}
        best = sorted(
            cut, key=lambda c: (-score[c], [(t if t >= 0 else -1) for t in c] + [-1] * (length - len(c)))
        )
        return [(c, n, score[c]) for c in best[:paths]]
    return []


@pytest.mark.parametrize("min_count", [1, 2])
def test_lookups_equal_a_brute_force_search(min_count, tmp_path):
    rng = np.random.default_rng(min_count)
    docs = [list(rng.integers(0, 4, rng.integers(3, 40))) for _ in range(12)]
    kw = dict(min_n=1, max_n=3, length=4, paths=3, min_count=min_count)
    tables, info = rest.build(docs, vocab_size=8, **kw)
    rest.save(tmp_path / "ds.npz", tables, info)
    loaded, info2 = rest.load(tmp_path / "ds.npz")
    assert info2 == info and all((loaded[k] == tables[k]).all() for k in tables)
    d = rest.Rest(8, max_depth=4, max_n=3, min_n=1, paths=3)
    params = rest.device_tables(loaded)
    ctxs = [list(rng.integers(0, 5, rng.integers(1, 10))) for _ in range(40)]  # token 4: never in the corpus
    s = max(map(len, ctxs))
    toks = np.zeros((len(ctxs), s), np.int32)
    for i, c in enumerate(ctxs):
        toks[i, : len(c)] = c
    ctx = Context(jnp.asarray(toks), jnp.asarray([len(c) for c in ctxs], jnp.int32))
    tok, ok, n = (np.asarray(x) for x in d.candidates(ctx, 3, params))
    hits = 0
    for i, c in enumerate(ctxs):
        want = brute(docs, c, **kw)
        got = [(tuple(int(t) for t in tok[i, r][ok[i, r]]), int(n[i, r])) for r in range(3) if ok[i, r, 0]]
        assert sorted(got) == sorted(w[:2] for w in want), (i, c)
        score = {w[0]: w[2] for w in want}
        assert [score[g[0]] for g in got] == sorted(score.values(), reverse=True)  # best first
        hits += bool(want)
    assert 0 < hits < len(ctxs)  # both found and missed suffixes were checked


def test_a_file_that_is_not_a_datastore_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="not a specdec datastore"):
        rest.load(tmp_path / "x.npz")
