"""AR decoding on the embedded target: specdec (JAX) vs HF transformers (torch) `generate`.

Measured in one run, interleaved, so machine noise hits all alike:
  1. greedy tokens/s on a few chat prompts (median over repeats) of specdec with the packed CPU
     layout (`specdec.matmul`, the default on CPU), with the plain XLA layout, and of HF; ratios;
  2. whether they produced the same tokens;
  3. the verification-block cost curve of both layouts side by side: one forward of T new tokens
     against a cached prompt, T = 1..64, as ratios to T = 1 (what a tree of T nodes costs per step);
  4. memory bandwidth: weight bytes streamed per token / AR step time, against what this machine
     streams (a 2-thread XLA reduction and the packed kernel over 512 MB, the larger counts);
  5. compile times (unrolled layers and lax.scan), and decode speed with scan.

    python benchmarks/ar_vs_hf.py --max_new_tokens 128 --repeats 3 --out runs/ar_vs_hf.json

Needs the test extra (torch, accelerate) for the HF side.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402
from common import cpu_model, load_avg, timed, write_json  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "target", "smollm2-135m-instruct", "Registry name or .gguf path (HF side reads the GGUF)."
)
flags.DEFINE_integer("max_new_tokens", 128, "Greedy tokens per prompt.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per prompt and system (median reported).")
flags.DEFINE_list("block_sizes", ["1", "2", "4", "8", "16", "32", "64"], "T values for the block-cost curve.")
flags.DEFINE_integer("block_rounds", 9, "Timed rounds of the block-cost curve (median per T).")
flags.DEFINE_bool("scan", True, "Also measure lax.scan layers (compile time and decode speed).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a hash map works, with a small Python example.",
    "What are three tips for staying focused while studying?",
    "Summarize the causes of the French Revolution in a paragraph.",
]


def stream_bandwidth(mb: int = 512) -> dict[str, float]:
    """GB/s this machine streams from memory: an XLA sum, and the packed kernel at T = 1, both over
    `mb` MB (far beyond the caches); medians of 7."""
    import jax
    import jax.numpy as jnp

    from specdec.matmul import dense, pack

    n = mb * 2**20 // 4
    big = jnp.ones((n // 4096, 4096), jnp.float32)
    packed = pack(jnp.ones((576, n // 576), jnp.float32))
    x = jnp.ones((1, 576), jnp.float32)
    out = {}
    head = jax.jit(lambda a: dense(x, a)[0, 0])
    probes = {
        "xla_sum": (jax.jit(jnp.sum), big, big.nbytes),
        "packed_kernel": (head, packed, packed.tiles.nbytes),
    }
    for name, (fn, arg, nbytes) in probes.items():
        fn(arg).block_until_ready()
        dts = [timed(lambda: fn(arg).block_until_ready())[1] for _ in range(7)]
        out[name] = round(nbytes / statistics.median(dts) / 1e9, 2)
    del big, packed
    return out


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from specdec import kernels
    from specdec.cache import KVCache, causal_mask
    from specdec.chat import chat_ids
    from specdec.generate import generate, warmup
    from specdec.loading import load_model, registry_path
    from specdec.matmul import plain
    from specdec.models import forward, to_device

    torch.set_num_threads(os.cpu_count() or 1)
    n_new = FLAGS.max_new_tokens
    result: dict = {"cpu_count": os.cpu_count(), "load_avg_start": load_avg(), "max_new_tokens": n_new}

    model = load_model(FLAGS.target)
    cfg, tok = model.cfg, model.tokenizer
    layouts = {name: to_device(model.params, cfg, name) for name in ("packed", "plain")}
    result["cpu"] = cpu_model()
    result["kernel_isa"] = kernels.ISA_NAMES[kernels.isa()]
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    # No EOS on either side: both generate exactly n_new tokens, so tokens/s compare like for like.
    gen = lambda ps, p, c: generate(ps, c, [p], max_new_tokens=n_new, eos_ids=[])

    gguf = registry_path(FLAGS.target) if not FLAGS.target.endswith(".gguf") else FLAGS.target
    gguf = os.fspath(gguf)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()

    def hf_gen(p):
        with torch.no_grad():
            ids = torch.tensor([p])
            out = hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        return out[0, len(p) :].tolist()

    # Compile (unrolled) and warm every side up.
    for name, ps in layouts.items():
        _, t_compile = timed(lambda: warmup(ps, cfg, [prompts[0]], max_new_tokens=n_new))
        result[f"compile_seconds_unrolled_{name}"] = round(t_compile, 2)
    hf_gen(prompts[0][:8])

    tps = {"packed": [], "plain": [], "hf": []}
    same = []
    for r in range(FLAGS.repeats):
        for i, p in enumerate(prompts):
            outs = {}
            for name, ps in layouts.items():
                outs[name], dt = timed(lambda: gen(ps, p, cfg).tokens[0])
                tps[name].append(len(outs[name]) / dt)
            outs["hf"], dt = timed(lambda: hf_gen(p))
            tps["hf"].append(len(outs["hf"]) / dt)
            time.sleep(0.3)  # torch's worker threads spin a while after a call: not into our timing
            if r == 0:
                same.append(outs["packed"] == outs["hf"] and outs["plain"] == outs["hf"])
            print(f"repeat {r} prompt {i}: " + "   ".join(f"{k} {v[-1]:6.1f} tok/s" for k, v in tps.items()))
    med = {k: statistics.median(v) for k, v in tps.items()}
    for k, v in med.items():
        result[f"{k}_tokens_per_s_median"] = round(v, 2)
    result["speed_ratio_ours_over_hf"] = round(med["packed"] / med["hf"], 3)
    result["speed_ratio_plain_over_hf"] = round(med["plain"] / med["hf"], 3)
    result["identical_tokens"] = f"{sum(same)}/{len(same)} prompts (packed, plain and HF)"

    # Memory bandwidth at T = 1: the dense weights stream once per token.
    dense_names = ("wqkv", "wo", "w_gate_up", "w_down")
    layers = layouts["plain"]["layers"]
    layer_floats = sum(int(np.prod(plain(lp[k]).shape)) for lp in layers for k in dense_names)
    weight_bytes = 4 * (layer_floats + cfg.vocab_size * cfg.hidden_size)  # + the LM head
    stream = stream_bandwidth()
    result["weight_mb_per_token"] = round(weight_bytes / 1e6, 1)
    result["stream_gb_per_s"] = stream
    best = max(stream.values())
    for name in layouts:
        gbps = weight_bytes * med[name] / 1e9
        result[f"ar_gb_per_s_{name}"] = round(gbps, 2)
        result[f"ar_fraction_of_stream_{name}"] = round(gbps / best, 3)

    # Block-cost curve of both layouts: a forward of T new tokens after a cached prompt, as
    # verification does; rounds interleave T and layout, medians per cell.
    prompt = jnp.asarray(prompts[1])[None]
    plen = prompt.shape[1]
    ts = [int(x) for x in FLAGS.block_sizes]
    block = jax.jit(lambda ps, toks, c: forward(ps, cfg, toks, c.lengths[:, None] + jnp.arange(toks.shape[1]),
                                                c, causal_mask(1, toks.shape[1]))[0])  # fmt: skip
    caches = {}
    for name, ps in layouts.items():
        cache = KVCache.init(cfg, 1, plen + max(ts) + 16)
        _, _, cache = forward(ps, cfg, prompt, jnp.arange(plen)[None], cache, causal_mask(1, plen))
        caches[name] = cache.advance(plen)
    toks = {t: jnp.asarray(np.random.RandomState(t).randint(0, cfg.vocab_size, (1, t))) for t in ts}
    for t in ts:
        for name, ps in layouts.items():
            block(ps, toks[t], caches[name]).block_until_ready()
    times = {(name, t): [] for name in layouts for t in ts}
    for _ in range(FLAGS.block_rounds):
        for t in ts:
            for name, ps in layouts.items():
                _, dt = timed(lambda: block(ps, toks[t], caches[name]).block_until_ready())
                times[(name, t)].append(dt)
    for name in layouts:
        curve = {t: statistics.median(times[(name, t)]) for t in ts}
        result[f"block_ms_{name}"] = {t: round(v * 1e3, 2) for t, v in curve.items()}
        result[f"block_cost_ratio_{name}"] = {t: round(v / curve[1], 2) for t, v in curve.items()}
    print("block cost (ratio to T=1):  T   " + "  ".join(f"{t:>5d}" for t in ts))
    for name in layouts:
        print(f"  {name:7s} ({result[f'block_ms_{name}'][1]:5.1f} ms at T=1)   "
              + "  ".join(f"{result[f'block_cost_ratio_{name}'][t]:5.2f}" for t in ts))  # fmt: skip

    if FLAGS.scan:
        scfg = cfg.replace(scan_layers=True)
        sparams = to_device(model.params, scfg, "packed")
        _, t_compile = timed(lambda: warmup(sparams, scfg, [prompts[0]], max_new_tokens=n_new))
        result["compile_seconds_scan"] = round(t_compile, 2)
        scan_tps = []
        for p in prompts:
            o, t_o = timed(lambda: gen(sparams, p, scfg).tokens[0])
            scan_tps.append(len(o) / t_o)
        result["scan_tokens_per_s_median"] = round(statistics.median(scan_tps), 2)
    result["load_avg_end"] = load_avg()

    write_json(result, FLAGS.out)


if __name__ == "__main__":
    app.run(main)
