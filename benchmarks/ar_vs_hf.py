"""AR decoding on the embedded target: specdec (JAX) vs HF transformers (torch) `generate`.

Measured in one run, interleaved, so machine noise hits both alike:
  1. greedy tokens/s of each on a few chat prompts (median over repeats) and their ratio;
  2. whether both produced the same tokens;
  3. the verification-block cost curve: one forward of T new tokens against a cached prompt,
     T = 1..64, as ratios to T = 1 (what a speculative tree of T nodes costs per step);
  4. compile times (unrolled layers and lax.scan), and decode speed with scan.

    python benchmarks/ar_vs_hf.py --max_new_tokens 128 --repeats 3 --out runs/ar_vs_hf.json

Needs the test extra (torch, accelerate) for the HF side.
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "target", "smollm2-135m-instruct", "Registry name or .gguf path (HF side reads the GGUF)."
)
flags.DEFINE_integer("max_new_tokens", 128, "Greedy tokens per prompt.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per prompt and system (median reported).")
flags.DEFINE_list("block_sizes", ["1", "2", "4", "8", "16", "32", "64"], "T values for the block-cost curve.")
flags.DEFINE_bool("scan", True, "Also measure lax.scan layers (compile time and decode speed).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")

PROMPTS = [
    "Write a short story about a robot learning to paint.",
    "Explain how a hash map works, with a small Python example.",
    "What are three tips for staying focused while studying?",
    "Summarize the causes of the French Revolution in a paragraph.",
]


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers

    from specdec.cache import KVCache, causal_mask
    from specdec.chat import chat_ids
    from specdec.generate import generate, warmup
    from specdec.loading import load_model, registry_path
    from specdec.models import forward, to_device

    torch.set_num_threads(os.cpu_count() or 1)
    n_new = FLAGS.max_new_tokens
    result: dict = {"cpu_count": os.cpu_count(), "load_avg_start": load_avg(), "max_new_tokens": n_new}

    model = load_model(FLAGS.target)
    cfg, tok = model.cfg, model.tokenizer
    params = to_device(model.params, cfg)
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

    # Compile (unrolled) and warm both sides up.
    _, t_compile = timed(lambda: warmup(params, cfg, [prompts[0]], max_new_tokens=n_new))
    result["compile_seconds_unrolled"] = round(t_compile, 2)
    hf_gen(prompts[0][:8])

    ours_tps, hf_tps, same = [], [], []
    for r in range(FLAGS.repeats):
        for i, p in enumerate(prompts):
            o, t_o = timed(lambda: gen(params, p, cfg).tokens[0])
            h, t_h = timed(lambda: hf_gen(p))
            ours_tps.append(len(o) / t_o)
            hf_tps.append(len(h) / t_h)
            if r == 0:
                same.append(o == h)
            print(f"repeat {r} prompt {i}: ours {len(o) / t_o:6.1f} tok/s   hf {len(h) / t_h:6.1f} tok/s")
    result["ours_tokens_per_s_median"] = round(statistics.median(ours_tps), 2)
    result["hf_tokens_per_s_median"] = round(statistics.median(hf_tps), 2)
    result["speed_ratio_ours_over_hf"] = round(statistics.median(ours_tps) / statistics.median(hf_tps), 3)
    result["identical_tokens"] = f"{sum(same)}/{len(same)} prompts"

    # Block-cost curve: forward of T new tokens after a cached prompt (as verification does).
    prompt = jnp.asarray(prompts[1])[None]
    plen = prompt.shape[1]
    cache = KVCache.init(cfg, 1, plen + 80)
    _, _, cache = forward(params, cfg, prompt, jnp.arange(plen)[None], cache, causal_mask(1, plen))
    cache = cache.advance(plen)
    block = jax.jit(lambda ps, toks, c: forward(ps, cfg, toks, c.lengths[:, None] + jnp.arange(toks.shape[1]),
                                                c, causal_mask(1, toks.shape[1]))[0])  # fmt: skip
    curve = {}
    for t in [int(x) for x in FLAGS.block_sizes]:
        toks = jnp.asarray(np.random.RandomState(t).randint(0, cfg.vocab_size, (1, t)))
        block(params, toks, cache).block_until_ready()
        times = []
        for _ in range(7):
            _, dt = timed(lambda: block(params, toks, cache).block_until_ready())
            times.append(dt)
        curve[t] = statistics.median(times)
    result["block_ms"] = {t: round(v * 1e3, 2) for t, v in curve.items()}
    result["block_cost_ratio"] = {t: round(v / curve[1], 2) for t, v in curve.items()}

    if FLAGS.scan:
        scfg = cfg.replace(scan_layers=True)
        sparams = to_device(model.params, scfg)
        _, t_compile = timed(lambda: warmup(sparams, scfg, [prompts[0]], max_new_tokens=n_new))
        result["compile_seconds_scan"] = round(t_compile, 2)
        tps = []
        for p in prompts:
            o, t_o = timed(lambda: gen(sparams, p, scfg).tokens[0])
            tps.append(len(o) / t_o)
        result["scan_tokens_per_s_median"] = round(statistics.median(tps), 2)
    result["load_avg_end"] = load_avg()

    print(json.dumps(result, indent=2))
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    app.run(main)
