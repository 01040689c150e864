"""Statistical losslessness of the verifiers: chi-square of emitted sequences against the exact target.

Harness and toy world: tests/verifier_toy.py. Lossless cases need a Bonferroni-corrected minimum
p and a combined p over 20 random worlds > 1e-4 and no impossible sequence; the negative controls
(tests/test_verifiers_controls.py) must fall below 1e-8 with the same harness.
"""

from __future__ import annotations

import pytest

from specdec.verifiers import get_verifier as get
from tests.verifier_toy import DET, IID, PASS_P, T05, T07K, T1, T13P, WOR, check

LOSSLESS_CASES = [
    ("speculative", (1, 1, 1), IID, T1),
    ("speculative", (1, 1), DET, T07K),
    ("rrs", (3,), WOR, T13P),
    ("rrs", (3, 2), WOR, T1),
    ("rrs", (2, 2, 2), WOR, T07K),
    ("rrs", (3, 2), IID, T13P),
    ("rrs", (3, 2), DET, T05),
    ("specinfer", (4,), IID, T07K),
    ("specinfer", (3, 2), IID, T1),
    ("target_only", (3, 2), DET, T13P),
    ("target_only", (3, 2), WOR, T07K),
    ("target_only", (3,), IID, T1),
    ("spectr", (4,), IID, T1),
    ("spectr", (3, 2), IID, T07K),
    ("spectr", (2, 2, 2), IID, T13P),
    ("block", (1, 1, 1), WOR, T1),  # block verification: chains of sampled drafts
    ("block", (1, 1), IID, T07K),
    ("block", (1, 1, 1), DET, T13P),  # rank-chosen drafts: q a point mass
    ("rapid:eta=0", (1, 1, 1), WOR, T1),  # RAPID at eta = 0: speculative sampling
    ("rapid:eta=0", (1, 1), DET, T07K),
]


def case_id(case) -> str:
    name, shape, drafting, s = case
    return f"{name}-{'x'.join(map(str, shape))}-{drafting.mode}-T{s.temperature}-k{s.top_k}-p{s.top_p}"


@pytest.mark.parametrize("name,shape,drafting,sampling", LOSSLESS_CASES, ids=map(case_id, LOSSLESS_CASES))
def test_lossless(name, shape, drafting, sampling):
    res = check(get(name), shape, drafting, sampling)
    print(f"{name} {shape} {drafting.mode}: bonferroni {res.bonferroni:.3g} combined {res.combined:.3g}")
    assert res.impossible == 0
    assert res.bonferroni > PASS_P and res.combined > PASS_P, res


def test_lossless_over_consecutive_steps():
    """Three speculative steps with per-step keys (the decode loop's plumbing) stay exact."""
    res = check(get("rrs"), (2, 1), WOR, T1, steps=3)
    print(f"rrs three steps: bonferroni {res.bonferroni:.3g} combined {res.combined:.3g}")
    assert res.impossible == 0
    assert res.bonferroni > PASS_P and res.combined > PASS_P, res
