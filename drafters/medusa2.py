"""Medusa-2: Medusa heads trained jointly with the target's last layers, producing a new target.

Medusa-1 freezes the target and trains heads on its features; Medusa-2 (the Medusa paper's second
recipe, `train/medusa2.py`) also fine-tunes the backbone so that its final state serves the heads
better, under a self-distillation loss that keeps its next-token distribution the original's. The
result is two things: a new target (the base with its last `backbone_layers` layers and final norm
replaced: a derived target, `specdec.checkpoints.derived`, under `RUN/target`) and Medusa heads
drafting for it (a plain Medusa drafter, `RUN/drafter`, whose drafter.json names the new target).
Speculative decoding with them is lossless with respect to the new target, not the original: the
quality drift is the fine-tuning's (`benchmarks/backbone_drift.py` measures it).

On the embedded target the package ships both: `--target smollm2-135m-instruct-medusa2 --drafter
medusa2`. Training: `specdec-train --drafter medusa2 --init_from <a Medusa-1 drafter> ...` starts
from trained heads (stage 1; `--init_from medusa`'s shipped heads: `specdec/data/drafters/medusa`).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from specdec.drafters import medusa
from specdec.drafters.family import Built, Export, Family, TrainTarget, option


@dataclasses.dataclass(frozen=True)
class Medusa2Config:
    """A joint run's shapes: the heads' (as Medusa's) and the backbone's trained layers (the last
    `backbone_layers` of the target's `num_layers`)."""

    num_heads: int
    hidden_size: int
    vocab_size: int
    draft_vocab_size: int
    backbone_layers: int
    num_layers: int

    @property
    def medusa(self) -> medusa.MedusaConfig:
        """The heads' config: a Medusa drafter on the new target's final state, the head shared."""
        return medusa.MedusaConfig(self.num_heads, self.hidden_size, self.vocab_size, self.draft_vocab_size,
                                   own_heads=False, tap=self.num_layers)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Medusa2Options:
    """specdec-train options of Medusa-2."""

    heads: int = option(4, "Medusa / Amphista / Medusa-2 heads.")
    backbone_layers: int = option(
        4, "Medusa-2: the target's last layers trained with the heads (and its final norm).", lower_bound=1
    )
    heads_weight: float = option(
        0.2,
        "Medusa-2: the heads' loss weight lambda0 (rising on a sine over the run) beside the backbone's KL.",
    )
    heads_lr: float = option(
        4.0, "Medusa-2: the heads' learning rate as a multiple of --lr (the backbone's)."
    )
    positions: int = option(
        128,
        "S2D / Medusa-2: answer positions per sequence the loss reads (0 = all; each costs LM heads).",
        lower_bound=0,
    )


def backbone_params(target: TrainTarget, k: int) -> dict:
    """The target's last `k` layers (stacked, plain layout, float32) and final norm: trainable copies."""
    from specdec.matmul import plain

    layers, n = target.params["layers"], target.cfg.num_layers
    if isinstance(layers, dict):  # stacked (scan_layers)
        last = {name: jax.tree.map(lambda x: x[n - k :], w) for name, w in layers.items()}
        stacked = {name: jnp.asarray(plain(w), jnp.float32) for name, w in last.items()}
    else:
        stacked = {name: jnp.stack([jnp.asarray(plain(lp[name]), jnp.float32) for lp in layers[n - k :]])
                   for name in layers[0]}  # fmt: skip
    return {"layers": stacked, "final_norm": jnp.asarray(target.params["final_norm"], jnp.float32)}


def _build(opts: Medusa2Options, tc, target: TrainTarget, key) -> Built:
    from specdec.drafters.checkpoint import target_head
    from specdec.train import medusa2 as joint  # here: the training modules import the drafter modules

    n, k = target.cfg.num_layers, opts.backbone_layers
    if k >= n:
        raise ValueError(f"--backbone_layers {k}: the target has {n} layers; train fewer than all")
    cfg = Medusa2Config(opts.heads, target.cfg.hidden_size, target.cfg.vocab_size,
                        target.draft_vocab_size or target.cfg.vocab_size, k, n)  # fmt: skip
    params = {**medusa.init_params(cfg.medusa, key), "backbone": backbone_params(target, k)}
    loss = functools.partial(joint.medusa2_loss, cfg=cfg, tcfg=target.cfg, steps=tc.steps,
                             heads_weight=opts.heads_weight, positions=opts.positions)  # fmt: skip
    frozen = {"full_head": jnp.asarray(target_head(target.params), jnp.float32)}
    return Built(cfg, params, loss, frozen=frozen, lr_scale={"w": opts.heads_lr, "b": opts.heads_lr})


def _from_medusa(meta: dict, loaded: dict, cfg: Medusa2Config, params: dict) -> dict:
    """Stage 2 from stage 1: a Medusa-1 checkpoint's heads (shared head, as many heads) start the run."""
    from specdec.drafters.checkpoint import DrafterCheckpointError

    have = meta["config"]
    if have.get("own_heads") or have.get("num_heads") != cfg.num_heads:
        raise DrafterCheckpointError(
            f"--init_from: a Medusa checkpoint with {have.get('num_heads')} heads (own_heads "
            f"{have.get('own_heads')}); Medusa-2 starts from {cfg.num_heads} heads on the shared head "
            "(--heads N to match it)"
        )
    return {**params, "w": jnp.asarray(loaded["w"], jnp.float32), "b": jnp.asarray(loaded["b"], jnp.float32)}


def _export(
    cfg: Medusa2Config, params: dict, target: TrainTarget, out: pathlib.Path, training: dict
) -> Export:
    """Write the new target (`out/target`, derived from the run's target) and return the heads as a
    Medusa drafter for it."""
    from specdec.checkpoints.derived import load_derived, save_derived
    from specdec.drafters.checkpoint import target_info
    from specdec.loading import registry_name

    bp, first = params["backbone"], cfg.num_layers - cfg.backbone_layers
    replaced = {"final_norm": np.asarray(bp["final_norm"], np.float32)}
    for name, w in bp["layers"].items():
        for i in range(cfg.backbone_layers):
            replaced[f"layers.{first + i}.{name}"] = np.asarray(w[i], np.float32)
    base = registry_name(target.source) or target.source
    record = {"command": training.get("command", ""), "steps": training.get("steps")}
    path = save_derived(out / "target", base, target.params, target.cfg, replaced, training=record)
    new = load_derived(path)
    heads = {"w": np.asarray(params["w"]), "b": np.asarray(params["b"])}
    return Export("medusa", cfg.medusa, heads, target_info(new.params, new.cfg, str(path)))


FAMILY = Family(
    name="medusa2", config=Medusa2Config, drafter=medusa.Medusa, options=Medusa2Options, build=_build,
    shares=lambda cfg: ("head",), loss_takes_step=True, shipped=True,
    taps=lambda opts, num_layers: (num_layers - opts.backbone_layers,), export=_export,
    warm_start={"medusa": _from_medusa},
)  # fmt: skip
