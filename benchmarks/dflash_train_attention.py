"""DFlash training step: dense `training_mask` attention vs context and block apart, in one run.

The anchored-block mask is block-diagonal over the A·K block queries, so the dense form computes
A·K × (T + A·K) scores of which A·K × A·K are all masked but A blocks of K × K;
`dflash.anchored_attention` computes A·K × T + A·K × K and merges by log-sum-exp. This times one
jitted forward + backward of `dflash.train_forward` (no head: the same in both) at SmolLM2-135M's
width for each (batch, anchors) point, alternating the two forms, and reports medians and the ratio.

    taskset -c 0 python benchmarks/dflash_train_attention.py --out docs/results/dflash_train_attention.json
"""

from __future__ import annotations

import statistics

from absl import app, flags
from common import cpu_model, load_avg, timed, write_json

FLAGS = flags.FLAGS
flags.DEFINE_list("points", ["4x32", "2x128", "4x128"], "BATCHxANCHORS per step.")
flags.DEFINE_integer("seq_len", 512, "Tokens per sequence (the context).")
flags.DEFINE_integer("block_size", 16, "Block size K.")
flags.DEFINE_integer("layers", 3, "Draft layers.")
flags.DEFINE_integer("repeats", 3, "Timed steps per form and point (median).")
flags.DEFINE_string("out", None, "JSON file for the results.")


def main(_):
    import jax
    import jax.numpy as jnp

    from specdec.drafters import dflash
    from specdec.models.config import ModelConfig

    # SmolLM2-135M's shape (the embedded target); weights are random: only the cost matters here.
    target = ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64, intermediate_size=1536)  # fmt: skip
    cfg = dflash.DFlashConfig.for_target(target, FLAGS.layers, FLAGS.block_size, 8192)
    params = dflash.init_params(cfg, jax.random.PRNGKey(0))
    embed = jax.random.normal(jax.random.PRNGKey(2), (49152, 576)) * 0.02  # the target's: frozen
    t = FLAGS.seq_len
    rows = []
    for point in FLAGS.points:
        b, a = (int(x) for x in point.split("x"))
        key = jax.random.PRNGKey(1)
        tokens = jax.random.randint(key, (b, t), 0, 49152)
        taps = tuple(jax.random.normal(jax.random.fold_in(key, i), (b, t, 576)) for i in cfg.taps)
        anchors = jnp.sort(jax.random.permutation(key, t - FLAGS.block_size)[:a])[None].repeat(b, 0)
        steps = {}
        for split in (False, True):

            def loss(p, split=split):
                out = dflash.train_forward(p | {"embed": embed}, cfg, tokens, taps, anchors, split=split)
                return jnp.mean(out**2)

            steps[split] = jax.jit(jax.grad(loss))
            jax.block_until_ready(steps[split](params))  # compile
        secs = {False: [], True: []}
        for _ in range(FLAGS.repeats):
            for split in (False, True):
                secs[split].append(timed(lambda s=split: jax.block_until_ready(steps[s](params)))[1])
        dense, split = statistics.median(secs[False]), statistics.median(secs[True])
        rows.append({"batch": b, "anchors": a, "dense_s": dense, "split_s": split,
                     "dense_over_split": dense / split})  # fmt: skip
        print(f"batch {b} × {a} anchors: dense {dense:.2f} s, split {split:.2f} s, ratio {dense / split:.2f}")
    write_json({"cpu": cpu_model(), "load": load_avg(), "seq_len": t, "block_size": FLAGS.block_size,
                "layers": FLAGS.layers, "points": rows}, FLAGS.out)  # fmt: skip


if __name__ == "__main__":
    app.run(main)
