"""S2D's confidence thresholds for one target, chosen on held-out training features.

A step drafts at the shallowest exit whose confidence at the root reaches its threshold
(`specdec.drafters.s2d.choose_exit`). On held-out answer positions of the target's own text we know,
per exit, the confidence and whether the exit's top-1 is the target's token (`hit`). For thresholds
τ, each position goes to the exit τ picks; the exit's acceptance ᾱ_e is the mean hit over the
positions sent there, a chain of `depth` drafts then yields 1 + ᾱ + … + ᾱ^depth tokens per step
(the bonus token included), at a cost of one verification plus `depth` draft passes at that exit.
`choose` takes the τ on a grid with the most tokens per unit of cost. Costs are in any unit: by
default the bytes a pass reads (a CPU decode step is memory-bound): the exit's layers plus the LM
head for a draft pass, the whole target for verification.

Held-out sequences only: never the evaluation's questions (MT-Bench, Spec-Bench).
"""

from __future__ import annotations

import itertools

import numpy as np


def expected_tokens(alpha: float, depth: int) -> float:
    """Tokens a chain of `depth` drafts yields per step when each is accepted with prob. `alpha`."""
    return float(sum(alpha**j for j in range(depth + 1)))


def route(conf: np.ndarray, thresholds) -> np.ndarray:
    """The exit each position goes to (`choose_exit`'s per-row rule): conf [N, M] -> [N]."""
    m = conf.shape[1]
    ok = conf[:, : m - 1] >= np.asarray(thresholds)[None, :]
    ok = np.concatenate([ok, np.ones((len(conf), 1), bool)], 1)  # the last exit takes the rest
    return np.argmax(ok, axis=1)


def speed(conf: np.ndarray, hit: np.ndarray, thresholds, costs, verify_cost: float, depth: int) -> dict:
    """Tokens per unit cost (and the exit shares) when thresholds route the positions."""
    exits = route(conf, thresholds)
    tokens = cost = 0.0
    share = []
    for e in range(conf.shape[1]):
        sel = exits == e
        n = int(sel.sum())
        share.append(n / len(exits))
        if n:
            tokens += n * expected_tokens(float(hit[sel, e].mean()), depth)
            cost += n * (verify_cost + depth * costs[e])
    return {"thresholds": [float(t) for t in thresholds], "tokens_per_cost": tokens / cost, "share": share}


GRID = tuple(float(x) for x in np.round(np.arange(0.3, 0.96, 0.05), 2))  # thresholds tried per exit


def choose(conf: np.ndarray, hit: np.ndarray, costs, verify_cost: float, depth: int,
           grid=GRID) -> tuple[dict, list[dict]]:  # fmt: skip
    """The best thresholds on `grid` (each exit but the last), and each exit pinned (every position
    sent there) for reference."""
    m = conf.shape[1]
    tried = (speed(conf, hit, t, costs, verify_cost, depth) for t in itertools.product(grid, repeat=m - 1))
    best = max(tried, key=lambda r: r["tokens_per_cost"])
    pinned = []
    for e in range(m):
        forced = np.zeros_like(conf)
        forced[:, e] = 1.0
        pinned.append(speed(forced, hit, [0.5] * (m - 1), costs, verify_cost, depth) | {"exit": e})
    return best, pinned
