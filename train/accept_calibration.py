"""Calibration of acceptance heads (step 3 of `specdec.train.acceptance`'s pipeline).

On held-out rows: binary cross-entropy of the head's de-biased prediction against the constant
predictor (globally and per depth) and the draft's own confidence q(y), reliability in equal-width
bins with the expected calibration error, the reliability plot and the markdown report.
"""

from __future__ import annotations

import os

import numpy as np

from specdec.drafters import accept_head


def bce(pred: np.ndarray, label: np.ndarray) -> float:
    """Mean binary cross-entropy of predictions against (soft) labels, predictions clipped to 1e-6."""
    p = np.clip(np.asarray(pred, np.float64), 1e-6, 1 - 1e-6)
    a = np.asarray(label, np.float64)
    return float(np.mean(-(a * np.log(p) + (1 - a) * np.log1p(-p))))


def reliability(pred: np.ndarray, label: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-width bins of the prediction: rows, mean prediction, mean label (observed acceptance)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(pred, edges[1:-1]), 0, bins - 1)
    out = []
    for k in range(bins):
        m = which == k
        out.append(
            {
                "lo": float(edges[k]),
                "hi": float(edges[k + 1]),
                "rows": int(m.sum()),
                "pred": float(pred[m].mean()) if m.any() else None,
                "obs": float(label[m].mean()) if m.any() else None,
            }
        )
    return out


def ece(bins: list[dict]) -> float:
    """Expected calibration error: Σ_bins rows/N |mean prediction - mean label|."""
    n = sum(b["rows"] for b in bins)
    return float(sum(b["rows"] * abs(b["pred"] - b["obs"]) for b in bins if b["rows"]) / max(n, 1))


def calibration(
    pred: np.ndarray,
    raw: np.ndarray,
    held: dict[str, np.ndarray],
    train: dict[str, np.ndarray],
    spec: accept_head.HeadSpec,
) -> dict:
    """Calibration of one head on held-out rows `held`: BCE of the de-biased prediction against the
    constant predictor (the training base rate), the per-depth constant (training base rate at each
    depth) and the draft's confidence q(y); the weighted objective against its best constant
    (Σp / (Σp + w Σ(1 - p)) on the training rows); reliability; all per depth too."""
    a, depth, conf = held["label"], held["depth"], held["conf"]
    base = float(train["label"].mean())
    by_depth = {int(d): float(train["label"][train["depth"] == d].mean()) for d in np.unique(train["depth"])}
    const_d = np.asarray([by_depth.get(int(d), base) for d in depth])
    w = spec.weight_mismatch
    sp, sn = train["label"].sum(), (1 - train["label"]).sum()
    c_w = float(sp / (sp + w * sn))

    def wloss(p1):
        p1 = np.clip(np.asarray(p1, np.float64), 1e-6, 1 - 1e-6)
        num = np.sum(w * (1 - a) * -np.log1p(-p1) + a * -np.log(p1))
        return float(num / np.sum(w * (1 - a) + a))

    rel = reliability(pred, a)
    rel_conf = reliability(conf, a)
    out = {
        "rows": int(len(a)),
        "sequences": int(len(np.unique(held["seq"]))),
        "base_rate_train": base,
        "base_rate_test": float(a.mean()),
        "mean_prediction": float(pred.mean()),
        "bce_head": bce(pred, a),
        "bce_constant": bce(np.full_like(a, base), a),
        "bce_depth_constant": bce(const_d, a),
        "bce_confidence": bce(conf, a),
        "bce_head_raw": bce(raw, a),
        "label_entropy": bce(np.clip(a, 1e-6, 1 - 1e-6), a),
        "weighted_loss_head": wloss(raw),
        "weighted_loss_constant": wloss(np.full_like(a, c_w)),
        "ece_head": ece(rel),
        "ece_confidence": ece(rel_conf),
        "ece_head_raw": ece(reliability(raw, a)),
        "reliability": rel,
        "reliability_confidence": rel_conf,
        "per_depth": [],
    }
    for d in sorted(np.unique(depth)):
        m = depth == d
        out["per_depth"].append(
            {
                "depth": int(d),
                "rows": int(m.sum()),
                "base_rate_test": float(a[m].mean()),
                "mean_prediction": float(pred[m].mean()),
                "bce_head": bce(pred[m], a[m]),
                "bce_constant": bce(np.full(m.sum(), base), a[m]),
                "bce_depth_constant": bce(const_d[m], a[m]),
                "bce_confidence": bce(conf[m], a[m]),
                "ece_head": ece(reliability(pred[m], a[m])),
            }
        )
    return out


def plot(cal: dict[str, dict], path: os.PathLike, title: str) -> None:
    """Reliability diagram: one panel per head (de-biased head, raw head, draft confidence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(cal)
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        c = cal[key]
        ax.plot([0, 1], [0, 1], color="0.7", lw=1, label="perfect")
        for name, rel, style in (
            ("head", c["reliability"], "o-"),
            ("draft confidence q(y)", c["reliability_confidence"], "s--"),
        ):
            pts = [(b["pred"], b["obs"]) for b in rel if b["rows"] >= 20]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{name} (ECE {ece(rel):.3f})")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted acceptance")
        ax.set_ylabel("observed acceptance (mean label)")
        ax.set_title(f"{key}: BCE head {c['bce_head']:.3f} vs constant {c['bce_constant']:.3f}", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(cal: dict[str, dict], info: dict) -> str:
    """A markdown summary of the calibration (`calibration` per head key) and how the heads were made."""
    lines = [
        f"Command: `{info['command']}`",
        "",
        f"Drafter: `{info['drafter']}`; examples: {info['sequences']} sequences ({info['train_sequences']} "
        f"train, then {info['valid_sequences']} validation (early stopping), then the last "
        f"{info['test_sequences']} for this test), depths 1..{info['depths']}, token mixing "
        f"{info['mixing']}, weight_mismatch {info['weight_mismatch']}, "
        f"{info['layers']}-layer weight-tied head{' reading q(y) too' if info['confidence'] else ''}, "
        f"{info['steps']} steps x {info['rows']} rows.",
        "",
        "| head | test rows | base rate (train / test) | mean prediction | BCE head | BCE constant | "
        "BCE per-depth constant | BCE draft q(y) | ECE head | ECE q(y) | "
        "weighted loss head / best constant |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(cal):
        c = cal[key]
        lines.append(
            f"| {key} | {c['rows']} | {c['base_rate_train']:.3f} / {c['base_rate_test']:.3f} | "
            f"{c['mean_prediction']:.3f} | **{c['bce_head']:.4f}** | {c['bce_constant']:.4f} | "
            f"{c['bce_depth_constant']:.4f} | {c['bce_confidence']:.4f} | {c['ece_head']:.3f} | "
            f"{c['ece_confidence']:.3f} | {c['weighted_loss_head']:.4f} / {c['weighted_loss_constant']:.4f} |"
        )
    for key in sorted(cal):
        c = cal[key]
        lines += [
            "",
            f"**{key}, per depth** (test):",
            "",
            "| depth | rows | observed | predicted | BCE head | BCE constant | BCE depth constant | "
            "BCE q(y) | ECE head |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d in c["per_depth"]:
            lines.append(
                f"| {d['depth']} | {d['rows']} | {d['base_rate_test']:.3f} | {d['mean_prediction']:.3f} | "
                f"{d['bce_head']:.4f} | {d['bce_constant']:.4f} | {d['bce_depth_constant']:.4f} | "
                f"{d['bce_confidence']:.4f} | {d['ece_head']:.3f} |"
            )
        lines += [
            "",
            f"**{key}, reliability** (test, 10 bins of the prediction):",
            "",
            "| bin | rows | predicted | observed |",
            "|---|---|---|---|",
        ]
        for b in c["reliability"]:
            if b["rows"]:
                lines.append(
                    f"| {b['lo']:.1f}-{b['hi']:.1f} | {b['rows']} | {b['pred']:.3f} | {b['obs']:.3f} |"
                )
    return "\n".join(lines) + "\n"
