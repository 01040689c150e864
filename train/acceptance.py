"""SpecDec++ acceptance heads for a trained drafter: examples, the official objective, calibration.

    specdec-train --accept_head --drafter_checkpoint eagle \\
        --regenerated data/selfdistill/smollm2-135m-instruct --skip_sequences 5600 --max_sequences 400 \\
        --features runs/accept/features --out runs/eagle-accept

The drafter is frozen; only the heads (`specdec.drafters.accept_head`, one per sampling temperature)
train. `run` does, resumably:

1. **Examples** (`accept_cache.build_examples`, cached in `out/examples/part_*.npz`). For every
   sequence of the feature set and every draft depth d = 1..K, the draft's own chain along the target's tokens
   (HASS-style: the depth-d node at position p has the root at p - d, ancestors = the target's tokens
   p-d+1..p-1 with the draft's own features, exactly what `Eagle.expand` computes for such a chain;
   `accept_examples.eagle_examples`). At the node the draft proposes y from its parent's logits: the top-1 at
   T = 0, a sample from q_T at T > 0. Labels: 1[y == the target's argmax] at T = 0 (hard), and
   min(1, p_T(y) / q_T(y)) at T > 0 (soft; p from the target's cached final state and frozen head,
   over the full vocabulary, q over the draft vocabulary, both at temperature T, no top-k / top-p).
   Token mixing (the official `--mixing_ratio`): with probability `mixing` the node's input token
   is the target's token instead of y, and the position is not counted. The head's input is the
   draft feature after consuming the node's token (`eagle.accept_input`). Positions count where the
   chain's tokens p-d+1..p are all answer tokens and the target's argmax is known. Each row also
   keeps the draft's confidence q_T(y), a baseline and the extra input of a `confidence` head.
   Falcon (`accept_examples.falcon_examples`): the same chain with Falcon's k-token passes; the
   node's token is read (and mixed) only at depths ≡ 0 (mod k), where its own pass runs, and the
   head gets a learned bias per depth (`accept_head.HeadSpec.depths`).
   A draft model or layer-skip (`accept_examples.draft_model_examples`) reads the same state at a
   node for every depth (its tokens are the target's): one row per position, the head reads the
   final normed state after y.
   Parallel drafters (Medusa, Amphista, DFlash; `accept_parallel.parallel_examples`) draft depth d
   from head (block position) d over what they computed for the root alone: the row is that head's
   state and its top-1 / sample, there is no token to mix, and the head gets a bias per depth.
2. **Heads** (`train_head`): the official weighted BCE (`losses.accept_loss`, weight_mismatch w),
   AdamW with warmup + cosine, orbax checkpoints under `out/heads/<key>` (a rerun resumes). Held
   out: the feature set's last `heldout` sequences, the first `valid` of them for validation (the
   params of the best validation BCE are kept: early stopping), the rest the calibration test.
3. **Calibration** (`accept_calibration.calibration`) on the test rows with the head as stored (bf16): binary
   cross-entropy of the de-biased prediction (`accept_head.prob`) against the constant predictor
   (the training base rate, globally and per depth) and the draft's own confidence q(y) (what an
   adaptive tree uses without a head), reliability in 10 bins, per depth.
4. `out/drafter` = the drafter checkpoint with the heads (`checkpoint.with_accept_heads`: its own
   arrays bit for bit), and `out/calibration.json`, `out/reliability.png`, `out/report.md`.
"""

from __future__ import annotations

import dataclasses
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
from tqdm import tqdm

from specdec.drafters import accept_head
from specdec.drafters import checkpoint as ckpt
from specdec.train import losses
from specdec.train.accept_cache import (
    build_examples,
    example_depths,
    head_depths,
    load_examples,
    token_mixing,
)
from specdec.train.accept_calibration import bce, calibration, plot, report
from specdec.train.features import FeatureSet


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


# -------------------------------------------------------------------------------------------- training
def _optimizer(ac: AcceptConfig) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, ac.lr, max(ac.warmup, 1), max(ac.steps, ac.warmup + 1), end_value=ac.lr * 0.05
    )
    return optax.chain(optax.clip_by_global_norm(ac.clip), optax.adamw(sched, weight_decay=ac.weight_decay))


def _conf(rows: dict, spec: accept_head.HeadSpec, sl=slice(None)):
    return jnp.asarray(rows["conf"][sl]) if spec.confidence else None


def _depth(rows: dict, spec: accept_head.HeadSpec, sl=slice(None)):
    return jnp.asarray(rows["depth"][sl], jnp.int32) if spec.depths else None


def predict(params, rows: dict[str, np.ndarray], spec: accept_head.HeadSpec, *, raw: bool = False,
            chunk: int = 65536) -> np.ndarray:  # fmt: skip
    """The head's de-biased (or `raw`) acceptance predictions for `rows` ("x" [N, D]; "conf" [N]
    for a head with `confidence`, "depth" [N] for one with `depths`), in chunks."""

    def f(p, x, conf, depth):
        if raw:
            return accept_head.raw_prob(p, x, spec.layers, conf, depth)
        return accept_head.prob(p, x, spec, conf, depth)

    f = jax.jit(f)
    n = len(rows["x"])
    out = []
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        out.append(
            np.asarray(f(params, jnp.asarray(rows["x"][sl]), _conf(rows, spec, sl), _depth(rows, spec, sl)))
        )
    return np.concatenate(out)


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
    """Train one head on rows `data` ("x", "label"; "conf" for a head with `confidence`, "depth" for
    one with `depths`) with the official objective; resumable (orbax in `out_dir`, the best params
    so far included). Every `eval_every` steps the weighted loss and the BCE of the de-biased
    prediction on `valid`; returns (the params of the lowest validation BCE: early stopping, history)."""
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    hidden = data["x"].shape[1]
    key = jax.random.fold_in(jax.random.PRNGKey(ac.seed), int(round(spec.temperature * 1000)))
    params = accept_head.init_params(key, hidden, confidence=spec.confidence, depths=spec.depths)
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
    def step_fn(state, x, y, conf, depth):
        def f(p):
            lg = accept_head.logits(p, x, spec.layers, conf, depth)
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
                              _conf(data, spec, idx), _depth(data, spec, idx))  # fmt: skip
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
    depths = head_depths(drafter, ac.depths)  # per-depth biases (parallel drafters, Falcon)
    mixing = token_mixing(drafter, ac.mixing)
    held_from = len(fs) - ac.heldout
    test_from = held_from + ac.valid
    cal, entries, hist = {}, {}, {}
    for t in ac.temperatures:
        spec = accept_head.HeadSpec(temperature=t, layers=ac.layers, weight_mismatch=ac.weight_mismatch,
                                    confidence=ac.confidence, depths=depths)  # fmt: skip
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
            "depths": depths or example_depths(drafter, ac.depths),
            "mixing": mixing,
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
                "depths": depths,
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
        "depths": depths or example_depths(drafter, ac.depths),
        "mixing": mixing,
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
