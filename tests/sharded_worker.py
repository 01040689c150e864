"""Run in a subprocess with 8 simulated CPU devices by tests/test_sharding.py (not a test module).

Decodes a random tiny target (Qwen2-style q/k/v biases, 8 query / 4 KV heads, vocabulary 96) in
the configurations given on the command line ("unsharded", mesh specs, "flash:<mesh spec>" for
the Pallas prefix kernel per shard), AR and speculative
(drafting with its own first layer, so drafts are partly accepted and the drafter's params are
sharded too), greedy and sampled, and prints one JSON line: {config: {case: outputs}, "devices": n}.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

from specdec import sharding
from specdec.attention import flash_splits
from specdec.drafters import layer_skip
from specdec.generate import generate
from specdec.models import ModelConfig, to_device
from specdec.sampling import SamplingConfig
from specdec.trees import parse_tree

CFG = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
                  head_dim=8, intermediate_size=96, attention_bias=True,
                  max_position_embeddings=256)  # fmt: skip
PROMPTS = [[5, 9, 3, 5, 9, 3, 5, 9], [12, 13, 14, 12, 13], list(range(20, 45))]
CASES = {  # name: (drafter, tree, temperature); the drafter: the target's first layer and head
    "ar": (None, None, 0.0),
    "chain": ("draft", "chain:3", 0.0),
    "static": ("draft", "static:[(0,),(1,),(0,0),(0,1),(1,0),(0,0,0)]", 0.0),
    "dynamic": ("draft", "dynamic:depth=3,topk=3,n=10", 0.0),
    "budget": ("draft", "dynamic:depth=3,topk=3,n=10+budget:5", 0.0),  # drafts pooled across rows
    "ar_t1": (None, None, 1.0),
    "chain_t1": ("draft", "chain:3", 1.0),
}


def random_params(cfg: ModelConfig, seed: int) -> dict:
    """Host params in the loader's checkpoint layout, scaled so that logits are far from uniform."""
    rng = np.random.default_rng(seed)
    d, f, i = cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, cfg.intermediate_size
    w = lambda *s: rng.normal(0, s[0] ** -0.5, s).astype(np.float32)  # noqa: E731
    layer = lambda: {
        "attn_norm": np.ones(d, np.float32),
        "wqkv": w(d, f),
        "wo": w(cfg.num_heads * cfg.head_dim, d),
        "mlp_norm": np.ones(d, np.float32),
        "w_gate_up": w(d, 2 * i),
        "w_down": w(i, d),
        **({"bqkv": rng.normal(0, 0.5, f).astype(np.float32)} if cfg.attention_bias else {}),
    }  # noqa: E731
    return {"embed": rng.normal(0, 1, (cfg.vocab_size, d)).astype(np.float32),
            "final_norm": np.ones(d, np.float32), "lm_head": w(d, cfg.vocab_size) * 4,
            "layers": [layer() for _ in range(cfg.num_layers)]}  # fmt: skip


MULTIHOST_CASES = ("ar", "dynamic")
# the cases each mesh runs: every case on the pure model mesh (the most sharded weights); a mesh
# of both axes adds row sharding (AR, a tree, sampling); a data-only mesh replicates the weights
# (rows: AR and pooled budgets)
MESH_CASES = {"model=8": tuple(CASES), "data=2,model=4": ("ar", "dynamic", "chain_t1"),
              "data=8": ("ar", "budget")}  # fmt: skip
FLASH_CASES = ("ar", "dynamic", "chain_t1")  # Pallas's interpreter is slow on CPU: a few cases
FLASH_CACHE = 64  # a cache size the decode kernel tiles (4 splits of 16), so the kernel runs


def run_all(params, cfg, mesh, cases=tuple(CASES), cache_size=None) -> dict:
    out = {}
    for name in cases:
        drafter, tree, temp = CASES[name]
        builder = tree and parse_tree(tree)
        d, dp = layer_skip(params, cfg, 1) if drafter else (None, None)
        res = generate(params, cfg, PROMPTS, max_new_tokens=12, drafter=d, draft_params=dp, builder=builder,
                       sampling=SamplingConfig(temperature=temp), seed=3, mesh=mesh,
                       cache_size=cache_size)  # fmt: skip
        out[name] = {"tokens": res.tokens, "row_steps": res.row_steps, "hist": res.accepted_hist}
    return out


def main(meshes: list[str]) -> None:
    """`meshes`: mesh specs, and/or "unsharded" for the single-device reference."""
    host = random_params(CFG, 0)
    result = {"devices": jax.device_count()}
    for spec in meshes:
        if spec == "unsharded":
            result[spec] = run_all(to_device(host, CFG), CFG, None)
            continue
        if spec.startswith("flash:"):  # the Pallas prefix kernel per shard (attention="flash")
            assert flash_splits(FLASH_CACHE) is not None
            mesh = sharding.parse_mesh(spec[6:])
            params, cfg = sharding.shard_params(host, CFG.replace(attention="flash"), mesh)
            result[spec] = run_all(params, cfg, mesh, FLASH_CASES, FLASH_CACHE)
            continue
        mesh = sharding.parse_mesh(spec)
        params, cfg = sharding.shard_params(host, CFG, mesh)
        result[spec] = run_all(params, cfg, mesh, MESH_CASES.get(spec, tuple(CASES)))
        w = params["layers"][0]["wqkv"]
        result[spec]["layout"] = {"wqkv_shard": list(w.addressable_shards[0].data.shape),
                                  "kv_heads": cfg.num_kv_heads, "tp_groups": cfg.tp_groups}  # fmt: skip
    print(json.dumps(result))


def multihost(process: int, port: int, spec: str) -> None:
    """One of two processes (2 simulated devices each) decoding on one mesh over both."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process)
    host = random_params(CFG, 0)
    mesh = sharding.parse_mesh(spec)
    params, cfg = sharding.shard_params(host, CFG, mesh)
    result = {"processes": jax.process_count(), "devices": jax.device_count(),
              spec: run_all(params, cfg, mesh, MULTIHOST_CASES)}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1].startswith("process="):  # process=I port=P mesh
        multihost(int(sys.argv[1][8:]), int(sys.argv[2][5:]), sys.argv[3])
    else:
        main(sys.argv[1:])
