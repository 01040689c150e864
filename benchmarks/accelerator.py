"""On a GPU/TPU: step and verification cost, speculative speedup and batch scaling, in one run.

1. A target with random weights of a real shape (`--shape llama3-8b`: Llama-3-8B, bf16, built on
   the device so the host never holds it): the T = 1 step and the verification forward of
   T = 2…128 tokens against a `--context`-token cache, as ratios to the T = 1 step (the cost
   curve that decides how large a tree pays), at each batch size of `--batch`, for each attention
   form of `--attention` (dense masked attention over the cache; split prefix + block merged by
   log-sum-exp, XLA einsums; flash: the prefix half through Pallas's split-K decode kernel).
2. The embedded target with the shipped drafters: greedy AR vs speculative on MT-Bench first
   turns, speedup and τ, at batch 1 and 8 (`batch_throughput.py`'s method on this device).

Without an accelerator it says so and exits (`--allow_cpu` runs it anyway, e.g. a smoke run with
`--shape tiny`). Results go to JSON; `docs/benchmarks.md` records them with the device name.

    python benchmarks/accelerator.py --out runs/accelerator.json
    python benchmarks/accelerator.py --allow_cpu --shape tiny --verify 1,4 --batch 1 --questions 2
"""

from __future__ import annotations

import os
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402
from common import cpu_model, load_avg, timed, write_json  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "llama3-8b", ["llama3-8b", "tiny"], "Random-weight target shape for part 1.")
flags.DEFINE_list("verify", ["1", "2", "4", "8", "16", "32", "64", "128"], "Verification block sizes T.")
flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
flags.DEFINE_list("attention", ["dense", "split", "flash"], "Attention forms for part 1.")
flags.DEFINE_integer("context", 512, "Committed tokens in the cache when verifying.")
flags.DEFINE_integer("repeats", 10, "Timed calls per point (median).")
flags.DEFINE_multi_string("config", ["ngram|chain:4", "eagle|chain:3", "eagle|dynamic:depth=6,topk=10,n=60"],
                          "drafter|tree for part 2 (shipped drafters of the embedded target).")  # fmt: skip
flags.DEFINE_integer("questions", 16, "MT-Bench first turns for part 2.")
flags.DEFINE_integer("max_new_tokens", 128, "Greedy tokens per prompt in part 2.")
flags.DEFINE_bool("allow_cpu", False, "Run without an accelerator (smoke runs).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")

SHAPES = {  # Llama-3-8B's config.json; "tiny" for smoke runs
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      head_dim=128, intermediate_size=14336, rope_theta=500000.0),
    "tiny": dict(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                 intermediate_size=256),
}  # fmt: skip


def random_target(shape: str, dtype: str):
    """(device params, cfg) of a random Llama of `shape`, generated on the device layer by layer."""
    import jax
    import jax.numpy as jnp

    from specdec.models import ModelConfig

    cfg = ModelConfig(arch="llama", max_position_embeddings=8192, dtype=dtype, **SHAPES[shape])
    dt, d = jnp.dtype(dtype), cfg.hidden_size
    f = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    key = iter(jax.random.split(jax.random.key(0), 4 + 4 * cfg.num_layers))
    w = jax.jit(lambda k, shape: (jax.random.normal(k, shape, jnp.float32) * shape[0] ** -0.5).astype(dt),
                static_argnums=1)  # fmt: skip
    ones = jnp.ones((d,), dt)
    hq, i = cfg.num_heads * cfg.head_dim, cfg.intermediate_size
    layers = [{"attn_norm": ones, "wqkv": w(next(key), (d, f)), "wo": w(next(key), (hq, d)), "mlp_norm": ones,
               "w_gate_up": w(next(key), (d, 2 * i)), "w_down": w(next(key), (i, d))}
              for _ in range(cfg.num_layers)]  # fmt: skip
    params = {"embed": w(next(key), (cfg.vocab_size, d)), "final_norm": ones,
              "lm_head": w(next(key), (d, cfg.vocab_size)), "layers": layers}  # fmt: skip
    return params, cfg


def verification_costs(params, cfg, sizes, batches, context, repeats) -> dict:
    """Seconds per forward of T new tokens (causal block) over a `context`-token cache, and ratios."""
    import jax
    import jax.numpy as jnp

    from specdec.cache import KVCache, causal_mask
    from specdec.models import forward

    fwd = jax.jit(lambda p, toks, pos, cache, mask: forward(p, cfg, toks, pos, cache, mask)[0])
    out = {}
    for b in batches:
        cache = KVCache.init(cfg, b, context + max(sizes)).replace(lengths=jnp.full((b,), context, jnp.int32))
        row = {}
        for t in sizes:
            toks = jnp.ones((b, t), jnp.int32)
            pos = context + jnp.broadcast_to(jnp.arange(t), (b, t))
            args = (params, toks, pos, cache, causal_mask(b, t))
            jax.block_until_ready(fwd(*args))
            row[t] = statistics.median(
                timed(lambda a=args: jax.block_until_ready(fwd(*a)))[1] for _ in range(repeats)
            )
        out[b] = {"seconds": row, "vs_T1": {t: s / row[min(sizes)] for t, s in row.items()}}
        print("batch", b, {t: round(r, 2) for t, r in out[b]["vs_T1"].items()}, flush=True)
    return out


def speculative(configs, questions, max_new_tokens, batches) -> dict:
    """Embedded target: AR vs each config on MT-Bench first turns, per batch size (one run)."""
    import jax

    from specdec.chat import chat_ids
    from specdec.eval.methods import Method
    from specdec.eval.questions import load_questions
    from specdec.generate import generate, warmup
    from specdec.loading import load_model
    from specdec.models import to_device

    model = load_model(
        "smollm2-135m-instruct", dtype="float32" if jax.default_backend() == "cpu" else "bfloat16"
    )
    params, cfg = to_device(model.params, model.cfg), model.cfg
    qs = load_questions("mt_bench")[:questions]
    prompts = [chat_ids(model.tokenizer, [{"role": "user", "content": q.turns[0]}]) for q in qs]
    methods = {"ar": {}} | {c: Method.parse(c).build(params, cfg) for c in configs}
    out = {}
    for b in batches:
        row = {lab: {"seconds": 0.0, "tokens": 0, "steps": 0, "tau_num": 0.0} for lab in methods}
        for i in range(0, len(prompts), b):
            batch = prompts[i : i + b]
            for lab, engine in methods.items():
                warmup(params, cfg, batch, max_new_tokens=max_new_tokens, **engine)
                res, sec = timed(
                    lambda e=engine, bt=batch: generate(params, cfg, bt, max_new_tokens=max_new_tokens, **e)
                )
                r = row[lab]
                r["seconds"] += sec
                r["tokens"] += sum(len(t) for t in res.tokens)
                r["steps"] += sum(res.row_steps)
                r["tau_num"] += res.tau * sum(res.row_steps)
        ar = row["ar"]["tokens"] / row["ar"]["seconds"]
        rate = {lab: r["tokens"] / r["seconds"] for lab, r in row.items()}
        out[b] = {lab: {"tokens_per_s": rate[lab], "speedup": rate[lab] / ar,
                        "tau": r["tau_num"] / max(r["steps"], 1)} for lab, r in row.items()}  # fmt: skip
        print("batch", b, {lab: round(v["speedup"], 2) for lab, v in out[b].items()}, flush=True)
    return out


def main(argv):
    del argv
    import jax

    backend = jax.default_backend()
    if backend == "cpu" and not FLAGS.allow_cpu:
        print("accelerator.py: no accelerator here (jax.devices() are CPU devices); nothing measured. "
              "Run it where a GPU/TPU is visible, or pass --allow_cpu for a smoke run.")  # fmt: skip
        return
    dtype = "float32" if backend == "cpu" else "bfloat16"
    sizes, batches = [int(x) for x in FLAGS.verify], [int(x) for x in FLAGS.batch]
    result = {"device": jax.devices()[0].device_kind, "backend": backend, "devices": jax.device_count(),
              "host_cpu": cpu_model(), "jax": jax.__version__, "dtype": dtype, "shape": FLAGS.shape,
              "context": FLAGS.context, "load_avg_start": load_avg()}  # fmt: skip
    params, cfg = random_target(FLAGS.shape, dtype)
    result["verification"] = {}
    for form in FLAGS.attention:
        print("attention", form, flush=True)
        result["verification"][form] = verification_costs(
            params, cfg.replace(attention=form), sizes, batches, FLAGS.context, FLAGS.repeats
        )
    del params
    result["speculative"] = speculative(FLAGS.config, FLAGS.questions, FLAGS.max_new_tokens, batches)
    result["load_avg_end"] = load_avg()
    write_json(result, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
