"""SpecDec++ acceptance heads for a trained drafter: examples, the official objective, calibration.

    specdec-train --accept_head --drafter_checkpoint eagle \\
        --regenerated data/selfdistill/smollm2-135m-instruct --skip_sequences 5600 --max_sequences 400 \\
        --features runs/accept/features --out runs/eagle-accept

The drafter is frozen; only the heads (`specdec.drafters.accept_head`, one per sampling temperature)
train. `run` does, resumably:

1. **Examples** (`build_examples`, cached in `out/examples/part_*.npz`). For every sequence of the
   feature set and every draft depth d = 1..K, the draft's own chain along the target's tokens
   (HASS-style: the depth-d node at position p has the root at p - d, ancestors = the target's tokens
   p-d+1..p-1 with the draft's own features, exactly what `Eagle.expand` computes for such a chain;
   `eagle_examples`). At the node the draft proposes y from its parent's logits: the top-1 at
   T = 0, a sample from q_T at T > 0. Labels: 1[y == the target's argmax] at T = 0 (hard), and
   min(1, p_T(y) / q_T(y)) at T > 0 (soft; p from the target's cached final state and frozen head,
   over the full vocabulary, q over the draft vocabulary, both at temperature T, no top-k / top-p).
   Token mixing (the official `--mixing_ratio`): with probability `mixing` the node's input token
   is the target's token instead of y, and the position is not counted. The head's input is the
   draft feature after consuming the node's token (`eagle.accept_input`). Positions count where the
   chain's tokens p-d+1..p are all answer tokens and the target's argmax is known. Each row also
   keeps the draft's confidence q_T(y), a baseline and the extra input of a `confidence` head.
2. **Heads** (`train_head`): the official weighted BCE (`losses.accept_loss`, weight_mismatch w),
   AdamW with warmup + cosine, orbax checkpoints under `out/heads/<key>` (a rerun resumes). Held
   out: the feature set's last `heldout` sequences, the first `valid` of them for validation (the
   params of the best validation BCE are kept: early stopping), the rest the calibration test.
3. **Calibration** (`calibration`) on the test rows with the head as stored (bf16): binary
   cross-entropy of the de-biased prediction (`accept_head.prob`) against the constant predictor
   (the training base rate, globally and per depth) and the draft's own confidence q(y) (what an
   adaptive tree uses without a head), reliability in 10 bins, per depth.
4. `out/drafter` = the drafter checkpoint with the heads (`checkpoint.with_accept_heads`: its own
   arrays bit for bit), and `out/calibration.json`, `out/reliability.png`, `out/report.md`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
from jaxtyping import Array, Float
from tqdm import tqdm

from specdec.attention import NEG_INF
from specdec.drafters import accept_head, eagle
from specdec.drafters import checkpoint as ckpt
from specdec.matmul import map_dense, plain
from specdec.models import decoder
from specdec.models.rope import rope_tables
from specdec.train import losses
from specdec.train.features import FeatureSet
from specdec.train.trainer import Batches


@dataclasses.dataclass(frozen=True)
class AcceptConfig:
    """Settings of an acceptance-head run (the `specdec-train --accept_*` flags and the general ones)."""

    temperatures: tuple[float, ...] = (0.0, 1.0)  # one head each; 0 = greedy (hard labels)
    depths: int = 6  # draft depths 1..K of the examples
    mixing: float = 0.15  # token mixing ratio (those positions are not counted)
    weight_mismatch: float = 6.0
    layers: int = 3  # the weight-tied ResBlock's repeats
    confidence: bool = False  # the head also reads the draft's q(y) (`accept_head`; not SpecDec++'s)
    steps: int = 2000
    rows: int = 1024  # examples per optimizer step
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    heldout: int = 32  # sequences: the feature set's last; the first `valid` of them validate
    valid: int = 16  # (early stopping), the rest are the calibration test
    seq_batch: int = 4  # sequences per example-building forward
    seq_len: int = 512
    seed: int = 0
    save_every: int = 500
    eval_every: int = 500

    def __post_init__(self):
        if not self.temperatures or len(set(map(accept_head.key_of, self.temperatures))) != len(
            self.temperatures
        ):
            raise ValueError(f"acceptance heads need distinct temperatures, got {self.temperatures}")
        for t in self.temperatures:
            accept_head.HeadSpec(temperature=t)  # checks the range
        if not 0.0 <= self.mixing < 1.0:
            raise ValueError(f"the token mixing ratio must be in [0, 1), got {self.mixing}")
        if self.depths < 1:
            raise ValueError(f"the examples need a depth >= 1, got {self.depths}")

    def example_settings(self) -> dict:
        """What the cached examples depend on (a cache made with other values is refused)."""
        return {
            "temperatures": list(self.temperatures),
            "depths": self.depths,
            "mixing": self.mixing,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "seq_batch": self.seq_batch,
        }


# ------------------------------------------------------------------------------------ EAGLE examples
def _shift(x, s: int):
    """x[:, j - s] at j (zeros for j < s) along axis 1."""
    return losses._shift(x, s)


def _attend(q, k0, v0, diag_k, diag_v, step: int, cfg: eagle.EagleConfig):
    """Attention of the depth-`step` chain nodes at every position j: step-0 keys at positions
    <= j - step (committed context up to the root) and one key per ancestor / the node itself
    (`diag_k[m - 1]` = the depth-m node's key, already aligned to j). Returns [B, n, Hq Dh]."""
    b, n = q.shape[:2]
    nkv, grp, dh = cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, cfg.head_dim
    j = jnp.arange(n)
    q = q.reshape(b, n, nkv, grp, dh) * dh**-0.5
    s_pre = jnp.einsum("btkgd,bskd->bkgts", q, k0, preferred_element_type=jnp.float32)
    s_pre = jnp.where(j[None, :] <= j[:, None] - step, s_pre, NEG_INF)
    s_diag = [
        jnp.einsum("btkgd,btkd->bkgt", q, dk, preferred_element_type=jnp.float32)[..., None] for dk in diag_k
    ]
    probs = jax.nn.softmax(jnp.concatenate([s_pre] + s_diag, axis=-1), axis=-1)
    attn = jnp.einsum("bkgts,bskd->btkgd", probs[..., :n], v0)
    for i, dv in enumerate(diag_v):
        attn = attn + probs[..., n + i].transpose(0, 3, 1, 2)[..., None] * dv[:, :, :, None, :]
    return attn.reshape(b, n, -1)


def eagle_examples(
    params,
    cfg: eagle.EagleConfig,
    batch: losses.Batch,
    target_head: Float[Array, "D V"],
    key,
    *,
    depths: int,
    temperatures: tuple[float, ...],
    mixing: float,
    tap_final: int,
) -> dict[str, dict[str, Array]]:
    """Acceptance-head examples of an EAGLE drafter for a batch of sequences [B, T] (pure; jit with
    the keyword arguments static).

    Index j (0..T-2) is position p = j + 1. At depth d the chain node at p has its root at p - d and
    the target's tokens as ancestors; its parent's logits (the depth d-1 output at p - 1) propose y.
    Returns per head key (`accept_head.key_of(T)`) arrays stacked over depth [K, B, T-1]: "x" (the
    head input, float16 [K, B, T-1, D]), "label", "conf" (the draft's q_T(y); greedy: the softmax
    probability of its top-1), "token" (y, target ids), "mask" (counted) and "mixed" (token-mixing
    positions: their input token is the target's, not y)."""
    params = map_dense(params, plain)
    toks = batch.tokens[:, 1:]
    b, n = toks.shape
    pos = jnp.broadcast_to(jnp.arange(1, n + 1), (b, n))
    lp, lc = params["layer"], cfg.layer_cfg
    rope = rope_tables(lc, pos)
    d2t = params.get("d2t")

    def branch(tokens, feature):
        x, resid = eagle.layer_input(params, cfg, tokens, feature)
        q, k, v = decoder.qkv(lp, lc, x, rope, norm=cfg.layer_norm)
        return q, k, v, resid

    feat = eagle.fuse(params, cfg, tuple(batch.taps[str(t)][:, :-1] for t in cfg.taps))
    q, k0, v0, resid = branch(toks, feat)
    out = decoder.finish(lp, lc, resid, _attend(q, k0, v0, [], [], 0, cfg))  # step 0: the root outputs
    answer = batch.loss_mask[:, 1:]  # token p is an answer token
    top1 = batch.top1[:, :-1]  # the target's argmax for token p (after position p - 1)
    j = jnp.arange(n)
    warm = [t for t in temperatures if t > 0]
    if warm:  # the target's logits for token p, full vocabulary
        final = batch.taps[str(tap_final)][:, :-1].astype(jnp.float32)
        tl = jnp.dot(final, target_head.astype(jnp.float32), preferred_element_type=jnp.float32)
    keys, values = [], []
    chain_ok = answer
    names = ("x", "token", "label", "conf", "mask", "mixed")
    res = {accept_head.key_of(t): {k: [] for k in names} for t in temperatures}
    for d in range(1, depths + 1):
        node_logits = _shift(eagle.draft_logits(params, cfg, out), 1)  # the parent's, for token p
        pfeat = _shift(out, 1)
        q, kk, vv, resid = branch(toks, pfeat)  # the chain continues on the target's token
        keys.append(kk)
        values.append(vv)
        diag_k = [_shift(km, d - m) for m, km in enumerate(keys, start=1)]
        diag_v = [_shift(vm, d - m) for m, vm in enumerate(values, start=1)]
        if d > 1:
            chain_ok = chain_ok & _shift(answer, d - 1)
        counted = chain_ok & (top1 >= 0) & (j >= d)[None, :]
        for ti, t in enumerate(temperatures):
            k_tok, k_mix = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, d), ti))
            if t == 0:
                yd = jnp.argmax(node_logits, -1)
                lq = jax.nn.log_softmax(node_logits, -1)
            else:
                lq = jax.nn.log_softmax(node_logits / t, -1)
                yd = jax.random.categorical(k_tok, lq, axis=-1)
            lq_y = jnp.take_along_axis(lq, yd[..., None], axis=-1)[..., 0]
            y = yd if d2t is None else d2t[yd]
            if t == 0:
                label = losses.accept_label_hard(y, top1)
            else:
                lp_all = tl / t
                lp_y = jnp.take_along_axis(lp_all, y[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(
                    lp_all, -1
                )
                label = losses.accept_label_soft(lp_y, lq_y)
            mixed = jax.random.uniform(k_mix, (b, n)) < mixing
            z = jnp.where(mixed, toks, y)
            qa, ka, va, ra = branch(z, pfeat)
            alt = decoder.finish(
                lp, lc, ra, _attend(qa, k0, v0, diag_k[:-1] + [ka], diag_v[:-1] + [va], d, cfg)
            )
            r = res[accept_head.key_of(t)]
            r["x"].append(eagle.accept_input(params, cfg, alt).astype(jnp.float16))
            r["token"].append(y)
            r["label"].append(label)
            r["conf"].append(jnp.exp(lq_y))
            r["mask"].append(counted & ~mixed)
            r["mixed"].append(mixed)
        out = decoder.finish(lp, lc, resid, _attend(q, k0, v0, diag_k, diag_v, d, cfg))
    return {k: {name: jnp.stack(v) for name, v in r.items()} for k, r in res.items()}


EXAMPLES: dict[str, Callable] = {"eagle": eagle_examples}  # drafter.json family -> example builder


# ----------------------------------------------------------------------------------- example cache
def build_examples(
    drafter,
    params,
    target_head,
    fs: FeatureSet,
    out_dir: os.PathLike,
    ac: AcceptConfig,
    *,
    progress: bool = True,
    drafter_id: str = "",
    log: Callable[[str], None] = print,
) -> pathlib.Path:
    """Write the examples of every sequence of `fs` to `out_dir/part_XXXXX.npz` (`seq_batch`
    sequences each, only counted rows: per head key "x" [N, D] f16, "label", "conf", "depth",
    "seq"); resumes at the first missing part. Part g's randomness is a function of (seed, g).
    `drafter_id` (`checkpoint.digest`) tells the drafter apart: a cache of another is refused."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = ac.example_settings() | {"sequences": len(fs), "drafter": drafter_id}
    mf = out / "manifest.json"
    if mf.exists():  # a cache with more temperatures serves a run that trains some of them
        have = json.loads(mf.read_text())
        other = {k: (have.get(k), v) for k, v in settings.items() if k != "temperatures" and have.get(k) != v}
        if other or not set(settings["temperatures"]) <= set(have["temperatures"]):
            raise ValueError(
                f"{out} holds acceptance examples made with other settings (cached vs requested: "
                f"{other or {'temperatures': (have['temperatures'], settings['temperatures'])}}); "
                "use another folder or delete it"
            )
        settings = have  # missing parts are built as the cache's own (its temperatures, in its order)
    mf.write_text(json.dumps(settings, indent=1))
    family = "eagle" if isinstance(drafter, eagle.Eagle) else type(drafter).__name__
    if family not in EXAMPLES:
        raise ValueError(f"acceptance heads are trained for {', '.join(EXAMPLES)} drafters, not {family}")
    fn = jax.jit(
        functools.partial(
            EXAMPLES[family],
            cfg=drafter.cfg,
            depths=ac.depths,
            temperatures=tuple(settings["temperatures"]),
            mixing=ac.mixing,
            tap_final=fs.taps[-1],
        )
    )
    batches = Batches(fs, np.arange(len(fs)), 1, ac.seq_len, ac.seed)
    n_parts = -(-len(fs) // ac.seq_batch)
    done = {int(p.stem.split("_")[1]) for p in out.glob("part_*.npz")}
    bar = tqdm(
        total=n_parts, initial=len(done), desc="acceptance examples", unit="part", disable=not progress
    )
    for g in range(n_parts):
        if g in done:
            continue
        seqs = np.arange(g * ac.seq_batch, min((g + 1) * ac.seq_batch, len(fs)))
        padded = np.concatenate([seqs, np.full(ac.seq_batch - len(seqs), seqs[-1])])
        batch = batches.make(padded)
        batch = dataclasses.replace(
            batch, loss_mask=batch.loss_mask & (np.arange(ac.seq_batch) < len(seqs))[:, None]
        )
        res = jax.device_get(
            fn(
                params,
                batch=batch,
                target_head=target_head,
                key=jax.random.fold_in(jax.random.PRNGKey(ac.seed), g),
            )
        )
        arrays = {}
        for key, r in res.items():
            m = np.asarray(r["mask"])
            kk, bb, _ = np.nonzero(m)
            arrays[f"{key}.x"] = np.asarray(r["x"])[m]
            arrays[f"{key}.label"] = np.asarray(r["label"], np.float32)[m]
            arrays[f"{key}.conf"] = np.asarray(r["conf"], np.float32)[m]
            arrays[f"{key}.depth"] = (kk + 1).astype(np.int8)
            arrays[f"{key}.seq"] = padded[bb].astype(np.int32)
        tmp = out / f".part_{g:05d}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, out / f"part_{g:05d}.npz")
        bar.update(1)
    bar.close()
    return out


def load_examples(out_dir: os.PathLike, key: str) -> dict[str, np.ndarray]:
    """All cached examples of head `key`, concatenated in part order."""
    parts = sorted(pathlib.Path(out_dir).glob("part_*.npz"))
    if not parts:
        raise ValueError(f"{out_dir} holds no acceptance examples")
    loaded = [np.load(p) for p in parts]
    return {
        name: np.concatenate([f[f"{key}.{name}"] for f in loaded])
        for name in ("x", "label", "conf", "depth", "seq")
    }


# -------------------------------------------------------------------------------------------- training
def _optimizer(ac: AcceptConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, ac.lr, max(ac.warmup, 1), max(ac.steps, ac.warmup + 1), end_value=ac.lr * 0.05
    )
    return optax.chain(optax.clip_by_global_norm(ac.clip), optax.adamw(sched, weight_decay=ac.weight_decay))


def bce(pred: np.ndarray, label: np.ndarray) -> float:
    """Mean binary cross-entropy of predictions against (soft) labels, predictions clipped to 1e-6."""
    p = np.clip(np.asarray(pred, np.float64), 1e-6, 1 - 1e-6)
    a = np.asarray(label, np.float64)
    return float(np.mean(-(a * np.log(p) + (1 - a) * np.log1p(-p))))


def _conf(rows: dict, spec: accept_head.HeadSpec, sl=slice(None)):
    return jnp.asarray(rows["conf"][sl]) if spec.confidence else None


def predict(params, rows: dict[str, np.ndarray], spec: accept_head.HeadSpec, *, raw: bool = False,
            chunk: int = 65536) -> np.ndarray:  # fmt: skip
    """The head's de-biased (or `raw`) acceptance predictions for `rows` ("x" [N, D]; "conf" [N]
    for a head with `confidence`), in chunks."""

    def f(p, x, conf):
        return accept_head.raw_prob(p, x, spec.layers, conf) if raw else accept_head.prob(p, x, spec, conf)

    f = jax.jit(f)
    n = len(rows["x"])
    return np.concatenate(
        [np.asarray(f(params, jnp.asarray(rows["x"][i : i + chunk]), _conf(rows, spec, slice(i, i + chunk))))
         for i in range(0, n, chunk)]
    )  # fmt: skip


def train_head(
    data: dict[str, np.ndarray],
    valid: dict[str, np.ndarray],
    spec: accept_head.HeadSpec,
    ac: AcceptConfig,
    out_dir: os.PathLike,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> tuple[dict, list]:
    """Train one head on rows `data` ("x", "label"; "conf" for a head with `confidence`) with the
    official objective; resumable (orbax in `out_dir`, the best params so far included). Every
    `eval_every` steps the weighted loss and the BCE of the de-biased prediction on `valid`; returns
    (the params of the lowest validation BCE: early stopping, history)."""
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    hidden = data["x"].shape[1]
    key = jax.random.fold_in(jax.random.PRNGKey(ac.seed), int(round(spec.temperature * 1000)))
    params = accept_head.init_params(key, hidden, confidence=spec.confidence)
    opt = _optimizer(ac)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32),
             "best": params, "best_bce": jnp.asarray(jnp.inf, jnp.float32)}  # fmt: skip
    mngr = ocp.CheckpointManager(out / "orbax", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = mngr.latest_step()
    if start is not None:
        state = mngr.restore(
            start, args=ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, state))
        )
        log(f"head {spec.key}: resumed from step {start}")
    start = int(start or 0)
    n = len(data["label"])
    rows = min(ac.rows, n)
    per_epoch = max(n // rows, 1)

    @jax.jit
    def step_fn(state, x, y, conf):
        def f(p):
            lg = accept_head.logits(p, x, spec.layers, conf)
            return losses.accept_loss(lg, y, jnp.ones(y.shape, bool), spec.weight_mismatch)

        loss, grads = jax.value_and_grad(f)(state["params"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
               "step": state["step"] + 1}  # fmt: skip
        return {**state, **new}, loss

    def evaluate(params) -> dict:
        raw = np.clip(predict(params, valid, spec, raw=True), 1e-7, 1 - 1e-7)
        lg = jnp.stack([jnp.zeros(len(raw)), jnp.log(raw) - jnp.log1p(-raw)], -1)
        y = jnp.asarray(valid["label"])
        wl = float(losses.accept_loss(lg, y, jnp.ones(len(raw), bool), spec.weight_mismatch))
        return {"weighted_loss": wl, "bce": bce(predict(params, valid, spec), valid["label"])}

    hist_file = out / "history.json"
    history = json.loads(hist_file.read_text()) if hist_file.exists() else []
    history = [h for h in history if h["step"] <= start]
    bar = tqdm(
        range(start, ac.steps), initial=start, total=ac.steps, desc=f"head {spec.key}", disable=not progress
    )
    for s in bar:
        epoch, i = divmod(s, per_epoch)
        idx = np.sort(np.random.default_rng([ac.seed, epoch]).permutation(n)[i * rows : (i + 1) * rows])
        state, loss = step_fn(state, jnp.asarray(data["x"][idx]), jnp.asarray(data["label"][idx]),
                              _conf(data, spec, idx))  # fmt: skip
        done = s + 1
        if s % 20 == 0 or done == ac.steps:
            bar.set_postfix(loss=f"{float(loss):.4f}")
            history.append({"step": done, "loss": float(loss)})
        if done % ac.eval_every == 0 or done == ac.steps:
            ev = evaluate(state["params"])
            history.append({"step": done, "valid": ev})
            if ev["bce"] < float(state["best_bce"]):
                state = {**state, "best": state["params"], "best_bce": jnp.asarray(ev["bce"], jnp.float32)}
                history[-1]["best"] = True
            log(f"head {spec.key} step {done}: validation " + " ".join(f"{k} {v:.4f}" for k, v in ev.items()))
        if done % ac.save_every == 0 or done == ac.steps:
            mngr.save(done, args=ocp.args.StandardSave(state), force=True)
            hist_file.write_text(json.dumps(history))
    mngr.wait_until_finished()
    return jax.device_get(state["best"]), history


# ----------------------------------------------------------------------------------------- calibration
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


def _stored(params: dict, dtype: str) -> dict:
    """`params` as the checkpoint stores them (bf16 rounding), back in f32."""
    store = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    return {
        k: jnp.asarray(np.asarray(v, np.float32).astype(store).astype(np.float32)) for k, v in params.items()
    }


def run(
    drafter_path: os.PathLike,
    target_params,
    target_cfg,
    fs: FeatureSet,
    out_dir: os.PathLike,
    ac: AcceptConfig,
    *,
    command: str = "",
    progress: bool = True,
    dtype: str = "bfloat16",
    examples: os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """The whole pipeline (module doc): returns {"drafter": out/drafter, "calibration": {key: ...}}.
    `examples`: the example cache (default `out/examples`; one made with more temperatures serves)."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drafter, dparams = ckpt.load(drafter_path, target_params, target_cfg)
    if len(fs) <= ac.heldout or ac.heldout <= ac.valid:
        raise ValueError(
            f"{len(fs)} sequences, --heldout {ac.heldout}, validation {ac.valid}: need "
            "sequences > heldout > validation"
        )
    head_full = ckpt.target_head(target_params)
    ex_dir = pathlib.Path(examples or out / "examples")
    build_examples(drafter, dparams, head_full, fs, ex_dir, ac, progress=progress, log=log,
                   drafter_id=ckpt.digest(drafter_path))  # fmt: skip
    held_from = len(fs) - ac.heldout
    test_from = held_from + ac.valid
    cal, entries, hist = {}, {}, {}
    for t in ac.temperatures:
        spec = accept_head.HeadSpec(temperature=t, layers=ac.layers, weight_mismatch=ac.weight_mismatch,
                                    confidence=ac.confidence)  # fmt: skip
        ex = load_examples(ex_dir, spec.key)
        train = {k: v[ex["seq"] < held_from] for k, v in ex.items()}
        is_valid = (ex["seq"] >= held_from) & (ex["seq"] < test_from)
        valid = {k: v[is_valid] for k, v in ex.items()}
        held = {k: v[ex["seq"] >= test_from] for k, v in ex.items()}
        log(
            f"head {spec.key}: {len(train['label'])} training, {len(valid['label'])} validation and "
            f"{len(held['label'])} test rows; training base rate {train['label'].mean():.3f}"
        )
        params, hist[spec.key] = train_head(
            train, valid, spec, ac, out / "heads" / spec.key, progress=progress, log=log
        )
        stored = _stored(params, dtype)
        c = calibration(predict(stored, held, spec), predict(stored, held, spec, raw=True), held, train, spec)
        cal[spec.key] = c
        summary = {k: v for k, v in c.items() if not isinstance(v, list)}
        training = {
            "command": command,
            "steps": ac.steps,
            "rows_per_step": ac.rows,
            "lr": ac.lr,
            "warmup": ac.warmup,
            "depths": ac.depths,
            "mixing": ac.mixing,
            "seed": ac.seed,
            "train_rows": int(len(train["label"])),
            "sequences": len(fs),
            "valid_sequences": ac.valid,
            "test_sequences": ac.heldout - ac.valid,
            "best_step": max((h["step"] for h in hist[spec.key] if h.get("best")), default=None),
            "labels": "hard 1[y == target argmax]" if t == 0 else f"soft min(1, p/q) at T = {t:g}",
        }
        entries[spec.key] = (
            stored,
            {
                "temperature": t,
                "layers": ac.layers,
                "weight_mismatch": ac.weight_mismatch,
                "confidence": ac.confidence,
                "threshold": None,
                "training": training,
                "calibration": summary,
            },
        )
    path = ckpt.with_accept_heads(drafter_path, out / "drafter", entries, dtype=dtype)
    (out / "calibration.json").write_text(json.dumps(cal, indent=1))
    info = {
        "command": command,
        "drafter": str(drafter_path),
        "sequences": len(fs),
        "train_sequences": held_from,
        "valid_sequences": ac.valid,
        "test_sequences": ac.heldout - ac.valid,
        "depths": ac.depths,
        "mixing": ac.mixing,
        "weight_mismatch": ac.weight_mismatch,
        "layers": ac.layers,
        "confidence": ac.confidence,
        "steps": ac.steps,
        "rows": ac.rows,
    }
    (out / "report.md").write_text(report(cal, info))
    plot(
        cal,
        out / "reliability.png",
        f"acceptance heads of {pathlib.Path(str(drafter_path)).name} (test split)",
    )
    return {"drafter": str(path), "calibration": cal, "history": hist}
