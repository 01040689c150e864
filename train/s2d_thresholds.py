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


GRID = tuple(
    float(x) for x in np.round(np.arange(0.0, 0.96, 0.05), 2)
)  # thresholds tried per exit (0: always)


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


def exit_statistics(params, cfg, fs, sequences, *, eps: float, max_positions: int = 20000):
    """(conf [N, M], hit [N, M]) over the answer positions of feature-cache sequences `sequences`
    (up to `max_positions`): each exit's confidence at position p and whether its top-1 for token
    p + 1 is the target's. `params`: the drafter's runtime params (`checkpoint.load`)."""
    import jax
    import jax.numpy as jnp

    from specdec.drafters import s2d
    from specdec.matmul import dense

    @jax.jit
    def one(taps: dict, top1):
        conf, hit = [], []
        for i, e in enumerate(cfg.exits):
            x = s2d.exit_states(params, i, taps[str(e)].astype(jnp.float32), eps)
            conf.append(s2d.confidence(params, i, x))
            ids = jnp.argmax(dense(x, params["head"]), -1)  # in the draft vocabulary when d2t is given
            hit.append((ids if "d2t" not in params else params["d2t"][ids]) == top1)
        return jnp.stack(conf, -1), jnp.stack(hit, -1)

    taps, top1, n = {e: [] for e in cfg.exits}, [], 0
    for s in sequences:
        d = fs.seq(int(s), ["loss_mask", "top1"] + [f"tap_{e}" for e in cfg.exits])
        keep = np.nonzero(d["loss_mask"][1:] & (d["top1"][:-1] >= 0))[0]  # p predicts answer token p + 1
        for e in cfg.exits:
            taps[e].append(d[f"tap_{e}"][keep])
        top1.append(d["top1"][keep])
        n += len(keep)
        if n >= max_positions:
            break
    taps = {e: np.concatenate(v)[:max_positions] for e, v in taps.items()}
    top1 = np.concatenate(top1)[:max_positions]
    chunk, confs, hits = 1024, [], []  # fixed-size chunks: one compiled program

    def part(x, a):  # rows [a, a + chunk) of x, zero-padded
        return np.pad(x[a : a + chunk], [(0, max(0, a + chunk - len(x)))] + [(0, 0)] * (x.ndim - 1))

    for a in range(0, len(top1), chunk):
        c, h = one({str(e): jnp.asarray(part(t, a)) for e, t in taps.items()}, jnp.asarray(part(top1, a)))
        confs.append(np.asarray(c))
        hits.append(np.asarray(h, np.float64))
    m = len(top1)
    return np.concatenate(confs)[:m], np.concatenate(hits)[:m]


def pass_bytes(target_params, exits: tuple[int, ...], head=None) -> tuple[list[float], float]:
    """(bytes a draft pass reads at each exit: its layers and the LM head, `head` if given (the
    drafter's: the target's rows at a draft vocabulary), else the target's; bytes of a target step)."""
    import jax

    size = lambda tree: float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))  # noqa: E731
    layers = target_params["layers"]
    per_layer = size(layers) / (
        len(layers) if isinstance(layers, list) else jax.tree.leaves(layers)[0].shape[0]
    )
    head = size(head if head is not None else target_params.get("lm_head", target_params["embed"]))
    return [e * per_layer + head for e in exits], size(target_params)


def calibrate(drafter_path, target_params, target_cfg, fs, sequences, *, depth: int = 4,
              max_positions: int = 20000) -> dict:  # fmt: skip
    """Thresholds for the S2D checkpoint at `drafter_path` on `target_params`' feature-cache
    sequences `sequences` (held out from its training): the best on the grid and each exit pinned."""
    from specdec.drafters import checkpoint as ckpt

    d, dp = ckpt.load(drafter_path, target_params, target_cfg)
    conf, hit = exit_statistics(
        dp, d.cfg, fs, sequences, eps=target_cfg.rms_norm_eps, max_positions=max_positions
    )
    costs, verify = pass_bytes(target_params, d.cfg.exits, dp["head"])
    best, pinned = choose(conf, hit, costs, verify, depth)
    return {"best": best, "pinned": pinned, "positions": len(conf), "depth": depth,
            "hit_rate": hit.mean(0).tolist(), "mean_confidence": conf.mean(0).tolist(),
            "pass_bytes": costs, "target_bytes": verify}  # fmt: skip


def write_thresholds(drafter_path, thresholds, record: dict, target=None) -> None:
    """Set the checkpoint's thresholds and keep how they were chosen; the arrays are untouched.
    `target` None: the config's (`config.thresholds`, the training target's; `calibration`);
    `target` = (name, params, cfg): an entry of "thresholds_for", which `checkpoint.load` applies
    when it loads the drafter over that target (matched by its backbone's fingerprint)."""
    import json
    import pathlib

    from specdec.checkpoints.derived import backbone_fingerprint

    meta_file = pathlib.Path(drafter_path) / "drafter.json"
    meta = json.loads(meta_file.read_text())
    values = [float(t) for t in thresholds]
    if target is None:
        meta["config"]["thresholds"] = values
        meta["calibration"] = record
    else:
        name, params, cfg = target
        fp = backbone_fingerprint(params, cfg)
        entries = [e for e in meta.get("thresholds_for", []) if e["target"] != name]
        meta["thresholds_for"] = entries + [{"target": name, "backbone": fp, "thresholds": values,
                                             "calibration": record}]  # fmt: skip
    meta_file.write_text(json.dumps(meta, indent=1))


def main(argv) -> None:
    """python -m specdec.train.s2d_thresholds --drafter RUN/drafter --features DIR [--target T] [--write]"""
    del argv
    import json
    import pathlib

    from absl import flags

    from specdec.loading import load_model
    from specdec.sharding import device_params
    from specdec.train.features import FeatureSet

    f = flags.FLAGS
    model = load_model(f.target, scan_layers=True)
    params, cfg = device_params(model.params, model.cfg)
    fs = FeatureSet.open(f.features)
    held = range(len(fs) - f.heldout, len(fs))  # the cache's last sequences: held out by specdec-train
    res = calibrate(f.drafter, params, cfg, fs, held, depth=f.depth)
    res |= {"target": f.target, "features": str(f.features), "heldout": f.heldout}
    print(json.dumps(res, indent=1, default=float))
    if f.write:
        own = json.loads((pathlib.Path(f.drafter) / "drafter.json").read_text())["target"]
        same = own["source"] in (f.target, str(model.source))
        write_thresholds(f.drafter, res["best"]["thresholds"], res, None if same else (f.target, params, cfg))
        print(f"thresholds {res['best']['thresholds']} written to {f.drafter} for {f.target}")


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("drafter", None, "An S2D drafter checkpoint folder.", required=True)
    flags.DEFINE_string("target", "smollm2-135m-instruct", "The target the thresholds are for.")
    flags.DEFINE_string(
        "features", None, "A feature cache of that target with the exits' taps.", required=True
    )
    flags.DEFINE_integer("heldout", 64, "The cache's last N sequences (held out from training) calibrate.")
    flags.DEFINE_integer("depth", 4, "The chain depth the thresholds are chosen for.")
    flags.DEFINE_bool("write", False, "Write the best thresholds into the checkpoint.")
    app.run(main)
