"""Prompt lookup with several candidates (`NGram.candidates`, retrieval for tree fusion) equals a
brute-force search; its first candidate is the drafter's own proposal."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from specdec.context import Context
from specdec.drafters import NGram


def brute(row: list[int], k: int, r: int, min_n: int, max_n: int):
    """Candidate starts c (a suffix of length n in min_n..max_n ends at c - 1 before the row's own
    end), by (longest n, latest c); the r best, then repeats of a better proposal dropped."""
    length = len(row)
    found = []
    for c in range(1, length):
        ns = [
            n
            for n in range(min_n, max_n + 1)
            if n <= c and length >= n and row[c - n : c] == row[length - n :]
        ]
        if ns:
            found.append((max(ns), c))
    found.sort(reverse=True)
    out = []
    for n, c in found[:r]:
        prop = tuple(row[c : c + k])
        if prop not in [p for p, _ in out]:
            out.append((prop, n))
    return out


def test_candidates_equal_a_brute_force_search():
    rng = np.random.default_rng(0)
    d = NGram(vocab_size=8, max_depth=4, max_n=3, min_n=1)
    for trial in range(30):
        b, s = 3, 24
        lengths = rng.integers(1, s + 1, b)
        toks = rng.integers(0, 4 if trial % 2 else 8, (b, s))  # small alphabets: many matches
        if trial % 3 == 0:  # a periodic row: every occurrence proposes the same tokens (dropped)
            toks[0] = np.resize(rng.integers(0, 8, 3), s)
            lengths[0] = max(lengths[0], 12)
        ctx = Context(tokens=jnp.asarray(toks, jnp.int32), lengths=jnp.asarray(lengths, jnp.int32))
        r = 5
        tok, ok, n = (np.asarray(x) for x in d.candidates(ctx, r))
        assert tok.shape == ok.shape == (b, r, 4) and n.shape == (b, r)
        own, own_ok, own_n = (np.asarray(x) for x in d.lookup(None, ctx))
        for row in range(b):
            want = brute(list(toks[row, : lengths[row]]), 4, r, 1, 3)
            got = [(tuple(tok[row, i][ok[row, i]]), int(n[row, i])) for i in range(r) if n[row, i] > 0]
            assert got == want, (trial, row)
            assert not ok[row, len(want) :].any() and (tok[row, len(want) :] == 0).all()
            if trial % 3 == 0 and row == 0:
                assert len(want) < r  # repeats were dropped
            if want:  # the first candidate is the drafter's proposal
                assert (tok[row, 0] == own[row]).all() and (ok[row, 0] == own_ok[row]).all()
                assert n[row, 0] == own_n[row]
            else:
                assert own_n[row] == 0
