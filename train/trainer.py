"""The drafter training loop: optax AdamW, orbax checkpoints with exact resume, data parallelism.

`train(...)` trains one drafter family from a `FeatureSet` (cached target features):

- the draft vocabulary `d2t` is the `draft_vocab` ids the target most often predicts on the
  training split (all ids when `draft_vocab` is None), fixed before step 0 and saved with every
  checkpoint;
- batch `s` is a pure function of (seed, s): a seeded permutation per epoch, so a resumed run
  sees exactly the batches an uninterrupted run would;
- orbax saves {params, opt_state, step} every `save_every` steps; a rerun of the same command
  restores the latest step and continues (no step lost or repeated);
- with several devices the batch is sharded over a `("data",)` mesh and params are replicated;
  XLA inserts the gradient all-reduce (same math as one device);
- every `eval_every` steps the held-out split gives per-head/per-step top-1 accuracy and the chain
  acceptance estimate τ ≈ 1 + Σ_k Π_{j<=k} acc_j (teacher-forced, so an upper-bound-ish guide).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from specdec.drafters import checkpoint as ckpt
from specdec.drafters import family as families
from specdec.drafters.family import Family
from specdec.models.config import ModelConfig
from specdec.train import losses
from specdec.train.features import FeatureSet


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run's general settings, and its family's own options (`options`).

    `family` is a registry name (`specdec.drafters.family.FAMILIES`: "medusa", "amphista", "eagle"
    (EAGLE-1/2), "eagle3", "falcon", "dflash", or a registered plugin); `options` is that family's
    options dataclass (`Family.options`), a mapping of some of its fields (the rest default), or None
    (all defaults). An option of another family is refused (ValueError)."""

    family: str
    steps: int = 1000
    batch_size: int = 4
    seq_len: int = 512
    lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.0
    clip: float = 0.5
    seed: int = 0
    loss: str = "ce"  # divergence to the target distribution: ce | tv | lk (losses.py)
    draft_vocab: int | None = 8192
    heldout: int = 32  # sequences held out (the last ones of the feature set)
    eval_every: int = 200
    save_every: int = 100
    init_from: str | None = None  # a drafter checkpoint folder to start from (fine-tuning; its d2t kept)
    options: Any = None  # the family's options (see above)

    def __post_init__(self):
        fam = families.lookup(self.family)
        opts = self.options
        if opts is None or isinstance(opts, Mapping):
            opts = fam.make_options(opts)
        elif type(opts) is not fam.options:
            raise ValueError(
                f"options {type(opts).__name__} are not those of {self.family} ({fam.options.__name__})"
            )
        object.__setattr__(self, "options", opts)

    def record(self) -> dict:
        """The settings as one flat dict (general fields and the family's options): `drafter.json`'s
        training.train_config."""
        general = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**general, **dataclasses.asdict(self.options)}


def draft_vocab(counts: np.ndarray, size: int | None) -> np.ndarray | None:
    """The `size` most frequent target ids (ascending), or None for the full vocabulary."""
    if size is None or size >= len(counts):
        return None
    return np.sort(np.argsort(-counts, kind="stable")[:size]).astype(np.int32)


def t2d_map(d2t: np.ndarray | None, vocab: int) -> np.ndarray:
    """target id -> draft index, -1 outside the draft vocabulary."""
    if d2t is None:
        return np.arange(vocab, dtype=np.int32)
    out = np.full(vocab, -1, np.int32)
    out[d2t] = np.arange(len(d2t), dtype=np.int32)
    return out


class Batches:
    """Fixed-shape batches [B, seq_len] from a feature set; batch s is a function of (seed, s)."""

    def __init__(self, fs: FeatureSet, indices: np.ndarray, batch_size: int, seq_len: int, seed: int):
        if len(indices) < batch_size:
            raise ValueError(f"{len(indices)} training sequences, fewer than one batch of {batch_size}")
        self.fs, self.idx, self.b, self.t, self.seed = fs, indices, batch_size, seq_len, seed
        self.taps = [f"tap_{t}" for t in fs.taps]
        self.per_epoch = len(indices) // batch_size

    def seqs(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.idx)
        return perm[i * self.b : (i + 1) * self.b]

    def make(self, seqs) -> losses.Batch:
        b, t = len(seqs), self.t
        tokens, top1 = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
        mask = np.zeros((b, t), bool)
        taps = {k: None for k in self.taps}
        for r, s in enumerate(seqs):
            d = self.fs.seq(int(s), ["tokens", "loss_mask", "top1"] + self.taps)
            n = min(len(d["tokens"]), t)
            tokens[r, :n], top1[r, :n], mask[r, :n] = d["tokens"][:n], d["top1"][:n], d["loss_mask"][:n]
            for k in self.taps:
                if taps[k] is None:
                    taps[k] = np.zeros((b, t, d[k].shape[-1]), np.float16)
                taps[k][r, :n] = d[k][:n]
        return losses.Batch(tokens=tokens, loss_mask=mask, top1=top1,
                            taps={k.removeprefix("tap_"): v for k, v in taps.items()})  # fmt: skip

    def __call__(self, step: int) -> losses.Batch:
        return self.make(self.seqs(step))


def build(tc: TrainConfig, target_cfg: ModelConfig, target_params, d2t, key, source: str = ""):
    """(family, drafter config, trainable params, frozen params, loss fn(params, batch, t2d, key),
    LR multipliers of param groups).

    The family's `build` gives the config, params and loss; the frozen arrays are the target's head
    at `d2t` ("target_head", for soft targets), the arrays the family shares with the target
    (`Family.shares`: "embed", "head" = the head rows at `d2t`, as `checkpoint.bind` adds them at
    load time) and any the build adds."""
    family = families.lookup(tc.family)
    head = ckpt.target_head(target_params)
    head_d = head if d2t is None else jnp.take(head, jnp.asarray(d2t), axis=1)
    target = families.TrainTarget(cfg=target_cfg, params=target_params, d2t=d2t, head=head_d, source=source)
    built = family.build(tc.options, tc, target, key)
    if not isinstance(built.config, family.config) or not family.claims(built.config):
        raise TypeError(
            f"family {family.name}: its build gave a {type(built.config).__name__} that its entry does not "
            f"claim (config {family.config.__name__}, variant {dict(family.variant)})"
        )
    shares = family.shared(built.config)
    frozen = {"target_head": head_d}
    if "embed" in shares:
        frozen["embed"] = target_params["embed"]
    if "head" in shares:
        frozen["head"] = head_d
    frozen.update(built.frozen)
    return family, built.config, built.params, frozen, built.loss, dict(built.lr_scale)


def warm_start(path, meta: dict, loaded: dict, family: Family, dcfg, params: dict) -> dict:
    """`params` replaced by a checkpoint's (`ckpt.read(path)`: same family and config, else a
    one-line error)."""
    # the draft vocabulary is the run's; acceptance heads belong to the old weights (retrain them)
    loaded = {k: v for k, v in loaded.items() if k not in ("d2t", "accept")}
    have = ckpt.make_config(meta)
    if meta["family"] != family.stored and meta["family"] in family.warm_start:  # e.g. Medusa-1 -> Medusa-2
        return family.warm_start[meta["family"]](meta, loaded, dcfg, params)
    fix = "pass the flags it was trained with (its drafter.json has the command) or drop --init_from"
    if meta["family"] != family.stored or type(have) is not type(dcfg):
        raise ckpt.DrafterCheckpointError(
            f"--init_from {path} is a {type(have).__name__}, this run trains a {type(dcfg).__name__}: {fix}"
        )
    diff = [f"{f.name} {getattr(have, f.name)} vs {getattr(dcfg, f.name)}"
            for f in dataclasses.fields(dcfg) if getattr(have, f.name) != getattr(dcfg, f.name)]  # fmt: skip
    if diff or jax.tree.structure(loaded) != jax.tree.structure(params):
        raise ckpt.DrafterCheckpointError(
            f"--init_from {path} differs from the drafter this run trains "
            f"({', '.join(diff) or 'parameters'}): {fix}"
        )
    return jax.tree.map(lambda p, x: jnp.asarray(x, p.dtype).reshape(p.shape), params, loaded)


def _runtime(params, frozen):
    p = {**params, **frozen}
    if "lm_head" in p:
        p["head"] = p.pop("lm_head")
    return p


def optimizer(tc: TrainConfig, lr_scale: Mapping[str, float] | None = None) -> optax.GradientTransformation:
    """AdamW with warm-up and cosine decay after global-norm clipping; `lr_scale` multiplies the
    updates (so the learning rate) of top-level param groups (Medusa-2's heads: x4)."""
    sched = optax.warmup_cosine_decay_schedule(0.0, tc.lr, max(tc.warmup, 1), max(tc.steps, tc.warmup + 1),
                                               end_value=tc.lr * 0.05)  # fmt: skip
    chain = [optax.clip_by_global_norm(tc.clip), optax.adamw(sched, weight_decay=tc.weight_decay)]
    if lr_scale:
        chain.append(_scale_groups(lr_scale))
    return optax.chain(*chain)


def _scale_groups(lr_scale: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply the updates of each top-level param group by its factor (1 for groups not named)."""

    def update(updates, state, params=None):
        del params
        scaled = {}
        for k, v in updates.items():
            f = lr_scale.get(k, 1.0)
            scaled[k] = jax.tree.map(lambda u, f=f: u * f, v)
        return scaled, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def tau_estimate(metrics: dict, prefix: str = "acc") -> float:
    """1 + Σ_k Π_{j<=k} acc_j over the heads/steps (a chain's expected accepted length; with
    prefix "alpha", the T = 1 analogue from the expected acceptances)."""
    keys = sorted((k for k in metrics if k.startswith(prefix) and k[len(prefix):].isdigit()),
                  key=lambda k: int(k[len(prefix):]))  # fmt: skip
    return 1.0 + float(np.sum(np.cumprod([float(metrics[k]) for k in keys])))


def train(
    tc: TrainConfig,
    target_params,
    target_cfg: ModelConfig,
    target_source: str,
    fs: FeatureSet,
    out_dir: str | pathlib.Path,
    *,
    progress: bool = True,
    command: str = "",
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Train (or resume) and write the drafter checkpoint to `out_dir/drafter`; returns the summary.

    `stop_after` ends the run early after that global step (for tests of resumption).
    """
    out = pathlib.Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    n = len(fs)
    if n <= tc.heldout + tc.batch_size:
        raise ValueError(f"the feature set has {n} sequences: too few for --heldout {tc.heldout} + a batch")
    train_idx, held_idx = np.arange(n - tc.heldout), np.arange(n - tc.heldout, n)
    vocab_file = out / "d2t.npy"
    if tc.init_from:  # read once: its target, draft vocabulary and params
        init_meta, init_params = ckpt.read(tc.init_from)
        ckpt.check_target(init_meta, target_params, target_cfg, tc.init_from)
    if vocab_file.exists():  # resuming: the draft vocabulary is part of the run's state
        d2t = np.load(vocab_file)
        d2t = None if d2t.size == 0 else d2t
    else:  # a warm start keeps its checkpoint's draft vocabulary (the head rows it was trained on)
        if tc.init_from:
            d2t = init_params.get("d2t")
        else:
            d2t = draft_vocab(fs.token_counts(target_cfg.vocab_size), tc.draft_vocab)
        np.save(vocab_file, np.zeros(0, np.int32) if d2t is None else d2t)
    t2d = jnp.asarray(t2d_map(d2t, target_cfg.vocab_size))
    family, dcfg, params, frozen, loss_fn, lr_scale = build(
        tc, target_cfg, target_params, d2t, jax.random.PRNGKey(tc.seed), source=str(target_source)
    )
    if tc.init_from:  # (a resumed run restores its own state below)
        params = warm_start(tc.init_from, init_meta, init_params, family, dcfg, params)
    opt = optimizer(tc, lr_scale)
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}

    devices = jax.devices()
    ndev = len(devices) if tc.batch_size % len(devices) == 0 else 1
    mesh = Mesh(np.asarray(devices[:ndev]), ("data",))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(state, rep)
    frozen = jax.device_put(frozen, rep)

    mngr = ocp.CheckpointManager(out / "orbax", options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = mngr.latest_step()
    if start is not None:
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
        state = mngr.restore(start, args=ocp.args.StandardRestore(abstract))
        state = jax.device_put(state, rep)
        log(f"resumed from step {start} ({out / 'orbax'})")
    start = int(start or 0)

    @jax.jit
    def step_fn(state, frozen, batch, key):
        def f(p):
            extra = {"step": state["step"]} if family.loss_takes_step else {}  # e.g. Falcon's CSGD schedule
            return loss_fn(_runtime(p, frozen), batch=batch, t2d=t2d, key=key, **extra)

        (loss, metrics), grads = jax.value_and_grad(f, has_aux=True)(state["params"])
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss, metrics

    @jax.jit
    def eval_fn(params, frozen, batch):  # e.g. EAGLE-1's and Falcon's features without noise
        return loss_fn(_runtime(params, frozen), batch=batch, t2d=t2d, key=jax.random.PRNGKey(0),
                       **family.eval_kwargs)  # fmt: skip

    batches = Batches(fs, train_idx, tc.batch_size, tc.seq_len, tc.seed)
    held = Batches(fs, held_idx, tc.batch_size, tc.seq_len, tc.seed)

    def evaluate(params) -> dict:
        ms = []
        for i in range(0, len(held_idx) - tc.batch_size + 1, tc.batch_size):
            b = jax.device_put(held.make(held_idx[i : i + tc.batch_size]), shard)
            loss, m = eval_fn(params, frozen, b)
            ms.append({"loss": float(loss), **{k: float(v) for k, v in m.items()}})
        mean = {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}
        mean["tau_est"] = tau_estimate(mean)
        if "alpha0" in mean:
            mean["tau_est_t1"] = tau_estimate(mean, "alpha")
        return mean

    history = json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []
    history = [h for h in history if h["step"] <= start]
    end = tc.steps if stop_after is None else min(tc.steps, stop_after)
    bar = tqdm(
        range(start, end), initial=start, total=tc.steps, desc=f"train {tc.family}", disable=not progress
    )
    loss = metrics = None
    for s in bar:
        batch = jax.device_put(batches(s), shard)
        state, loss, metrics = step_fn(
            state, frozen, batch, jax.random.fold_in(jax.random.PRNGKey(tc.seed), s)
        )
        if s % 10 == 0 or s == end - 1:
            m = {k: float(v) for k, v in metrics.items()}
            bar.set_postfix(
                loss=f"{float(loss):.3f}", **{k: f"{v:.2f}" for k, v in m.items() if k.startswith("acc")}
            )
            history.append({"step": s + 1, "loss": float(loss), **m})
        done = s + 1
        if done % tc.eval_every == 0 or done == tc.steps:
            ev = evaluate(state["params"])
            history.append({"step": done, "heldout": ev})
            log(f"step {done}: held-out " + " ".join(f"{k} {v:.3f}" for k, v in ev.items()))
        if done % tc.save_every == 0 or done == tc.steps:  # (stop_after simulates a kill: no save)
            mngr.save(done, args=ocp.args.StandardSave(state), force=True)
            (out / "history.json").write_text(json.dumps(history))
    mngr.wait_until_finished()
    final = int(state["step"])
    summary = {"step": final, "history": history}
    if final >= tc.steps:
        ev = next((h["heldout"] for h in reversed(history) if "heldout" in h), None) or evaluate(
            state["params"]
        )
        training = {"command": command, "train_config": tc.record(), "steps": final,
                    "tokens_seen": final * tc.batch_size * tc.seq_len, "heldout": ev,
                    "features": fs.manifest.get("num_examples")}  # fmt: skip
        params_host = jax.device_get(state["params"])
        if family.export is not None:  # e.g. Medusa-2: a new target, and the heads drafting for it
            target = families.TrainTarget(cfg=target_cfg, params=target_params, d2t=d2t, head=None,
                                          source=str(target_source))  # fmt: skip
            ex = family.export(dcfg, params_host, target, out, training)
        else:
            ex = families.Export(family.stored, dcfg, params_host,
                                 ckpt.target_info(target_params, target_cfg, target_source,
                                                  family.depth(dcfg) if family.depth else None))  # fmt: skip
        ckpt.save(out / "drafter", ex.family, ex.config, ex.params, ex.target, d2t=d2t, training=training)
        summary["heldout"] = ev
        summary["drafter"] = str(out / "drafter")
    return summary
