"""Long contexts on the target: chunked prefill time, and the cost of an AR step, a verification
block and a RAG drafter's step as the context grows, against the memory traffic each one needs.

A decode step at context L reads the weights once and L slots of KV cache per layer; on a CPU
both stream from memory, so the step's time ~ (weight bytes + KV bytes(L)) / bandwidth. A RAG
drafter (RAPID) reads its own weights and only its short context's KV: the script times it at the
drafter's context (`--draft_context`, the RAG budget) for the target itself (`rag:target`) and a
layer-skip self-draft (`rag:layerskip:K`), so the table shows where a drafter over a short
context is cheap against the target over the long one.

    python benchmarks/long_context.py --out docs/results/long_context_xeon.json

Timings are medians of interleaved repeats in one process (`--repeats`); one-block prefill (the
reference) is timed up to `--dense_max` tokens only (it grows ~T^2 in time and memory).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import statistics  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "target model (registry name, HF folder or .gguf)")
flags.DEFINE_list(
    "contexts", ["1024", "2048", "4096", "6144", "8064"], "context lengths (tokens) to measure at"
)
flags.DEFINE_integer("draft_context", 1024, "the RAG drafter's context (its retrieval budget)")
flags.DEFINE_integer("skip_layers", 6, "layer-skip drafter depth (the target's first K layers)")
flags.DEFINE_integer("block", 5, "verification block (a chain of block - 1 drafts and its root)")
flags.DEFINE_integer("repeats", 7, "timed repeats per measurement (medians)")
flags.DEFINE_integer("dense_max", 2048, "time one-block prefill (no chunks) up to this many tokens")
flags.DEFINE_string("out", None, "write the results as JSON here")
flags.DEFINE_string("plot", None, "write a plot (step cost against context) here")


SHORT, LONG = 4, 20  # forwards per timed call (see main)


def _forward_fn(params, cfg, t: int, steps: int):
    """jit: `steps` forwards of `t` tokens over a cache holding `lengths` slots, the cache carried
    through a loop as the decode loop carries it (updated in place: no copy of the cache)."""
    import jax
    import jax.numpy as jnp

    from specdec.cache import causal_mask
    from specdec.models import forward

    def fn(p, toks, cache):
        b = toks.shape[0]
        pos = cache.lengths[:, None] + jnp.arange(t)[None, :]

        first = jnp.zeros((b, 1), jnp.int32)

        def body(_, carry):
            acc, c = carry
            logits, _, c = forward(p, cfg, toks, pos, c, causal_mask(b, t), logits_idx=first)
            return acc + logits[0, 0, 0], c

        return jax.lax.fori_loop(0, steps, body, (jnp.float32(0), cache))[0]

    return jax.jit(fn)


def _time(fn, repeats: int) -> list[float]:
    import jax

    jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    from common import cpu_model, load_avg, write_json

    from specdec.cache import KVCache
    from specdec.loading import load_model
    from specdec.models import to_device
    from specdec.models.llama import prefill

    load_before = load_avg()
    loaded = load_model(FLAGS.target)
    cfg = loaded.cfg
    params = to_device(loaded.params, cfg)
    k = FLAGS.skip_layers
    skip_cfg = cfg.replace(num_layers=k)
    skip = {**params, "layers": params["layers"][:k]}
    # bytes a step streams: every weight but the embedding, of which it gathers one row per token
    streamed = lambda p: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves({**p, "embed": None}))
    weight_bytes = streamed(params)
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4
    contexts = [int(c) for c in FLAGS.contexts]
    rng = np.random.default_rng(0)
    tok = lambda t: jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)

    def filled(c, size: int, length: int) -> KVCache:
        # step timings read `length` slots; their content does not change the cost
        cache = KVCache.init(c, 1, size)
        return cache.replace(k=cache.k + 0.01, v=cache.v + 0.01, lengths=jnp.full((1,), length, jnp.int32))

    size = max(contexts) + 128
    # Each measurement: a loop of SHORT and one of LONG forwards; their time difference / (LONG -
    # SHORT) is one forward's, without the per-call cost (copying the cache in, dispatch).
    steps: dict[str, tuple] = {}
    for n in contexts:
        steps[f"ar@{n}"] = (cfg, params, 1, filled(cfg, size, n))
        steps[f"verify{FLAGS.block}@{n}"] = (cfg, params, FLAGS.block, filled(cfg, size, n))
    d = FLAGS.draft_context
    steps[f"rag:target@{d}"] = (cfg, params, 1, filled(cfg, d + 128, d))
    steps[f"rag:layerskip:{k}@{d}"] = (skip_cfg, skip, 1, filled(skip_cfg, d + 128, d))
    fns = {(name, n): _forward_fn(p, c, t, n) for name, (c, p, t, _) in steps.items() for n in (SHORT, LONG)}
    times: dict[tuple, list[float]] = {key: [] for key in fns}
    for (name, _), fn in fns.items():  # compile all first
        _, p, t, c = steps[name]
        jax.block_until_ready(fn(p, tok(t), c))
    for _ in range(FLAGS.repeats):  # interleaved: drift hits every measurement alike
        for (name, n), fn in fns.items():
            _, p, t, c = steps[name]
            x = tok(t)
            times[(name, n)] += _time(lambda fn=fn, p=p, x=x, c=c: fn(p, x, c), 1)
    med = {key: statistics.median(v) for key, v in times.items()}
    step_ms = {name: 1e3 * (med[(name, LONG)] - med[(name, SHORT)]) / (LONG - SHORT) for name in steps}

    prefill_s: dict[str, float] = {}
    for n in contexts:
        t = -(-n // 128) * 128
        x = tok(t)
        for label, chunk in (("chunked", "auto"), ("one_block", None)):
            if chunk is None and t > FLAGS.dense_max:
                continue
            cache, last = KVCache.init(cfg, 1, t + 64), jnp.array([[t - 1]])
            fn = jax.jit(
                lambda p, x, chunk=chunk, c=cache, last=last: prefill(p, cfg, x, c, last=last, chunk=chunk)[0]
            )
            prefill_s[f"{label}@{t}"] = statistics.median(
                _time(lambda fn=fn, x=x: fn(params, x), 1 if t > 4096 else 3)
            )

    skip_bytes = streamed(skip)
    rows = []
    for name, ms in step_ms.items():
        kind, ctx = name.rsplit("@", 1)
        ctx = int(ctx)
        if kind.startswith("rag:layerskip"):
            layers, wbytes = k, skip_bytes
        else:
            layers, wbytes = cfg.num_layers, weight_bytes
        kv = 2 * layers * cfg.num_kv_heads * cfg.head_dim * 4 * ctx
        mb = {"weight_MB": round(wbytes / 1e6, 1), "kv_MB": round(kv / 1e6, 1)}
        rows.append({"step": kind, "context": ctx, "ms": round(ms, 2), **mb,
                     "GB_per_s": round((wbytes + kv) / ms / 1e6, 2)})  # fmt: skip
    result = {
        "cpu": cpu_model(), "load_before": load_before, "target": FLAGS.target, "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token, "block": FLAGS.block, "repeats": FLAGS.repeats,
        "steps": rows, "prefill_seconds": prefill_s, "load_after": load_avg(),
    }  # fmt: skip
    write_json(result, FLAGS.out)
    print(f"{'step':<22}{'context':>8}{'ms':>9}{'MB read':>10}{'GB/s':>7}")
    for r in rows:
        mb = r["weight_MB"] + r["kv_MB"]
        print(f"{r['step']:<22}{r['context']:>8}{r['ms']:>9.1f}{mb:>10.0f}{r['GB_per_s']:>7.1f}")
    for name, s in prefill_s.items():
        print(f"prefill {name}: {s:.2f} s ({int(name.split('@')[1]) / s:.0f} tok/s)")
    if FLAGS.plot:
        _plot(rows, FLAGS.plot)


def _plot(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for kind in dict.fromkeys(r["step"] for r in rows):
        pts = [(r["context"], r["ms"]) for r in rows if r["step"] == kind]
        ax.plot(*zip(*pts, strict=True), "o-" if len(pts) > 1 else "s", label=kind)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("ms per forward")
    ax.set_title("Step cost against context")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    app.run(main)
