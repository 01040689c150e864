"""Decoding on a device mesh: sharded = unsharded token for token on 8 simulated CPU devices, the
tensor-parallel regrouping of the fused projections, and the mesh errors."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from specdec import sharding
from specdec.cache import causal_mask
from specdec.generate import generate
from specdec.models import forward, to_device
from tests.sharded_worker import CFG, FLASH_CASES, MESH_CASES, MULTIHOST_CASES, random_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = ["model=8", "data=2,model=4", "data=8"]  # 1×8 (KV heads repeated), 2×4 (KV heads split), 8×1
FLASH_MESHES = ["data=2,model=4"]  # the Pallas prefix kernel per shard (attention="flash"), both axes


def _env(devices: int) -> dict:
    """A subprocess's environment: the suite's XLA flags plus `devices` simulated CPU devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def sharded_runs():
    """The worker's outputs: fresh processes, so the 8 simulated devices do not leak into the suite.

    Two workers run side by side, each with a share of the configurations: compilation dominates
    and is single-threaded, and this file is the suite's longest, so splitting it shortens the
    suite's critical path under pytest-xdist too.
    """
    env = _env(8)
    groups = [["unsharded", MESHES[0]], [*MESHES[1:], *(f"flash:{m}" for m in FLASH_MESHES)]]
    cmd = lambda g: [sys.executable, "-m", "tests.sharded_worker", *g]  # noqa: E731
    procs = [subprocess.Popen(cmd(g), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for g in groups]  # fmt: skip
    outs = [p.communicate(timeout=1200) for p in procs]  # both finish before any assertion
    result = {}
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
        result.update(json.loads(out.strip().splitlines()[-1]))
    return result


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_decode_equals_unsharded(sharded_runs, mesh):
    assert sharded_runs["devices"] == 8
    base, got = sharded_runs["unsharded"], sharded_runs[mesh]
    cases = [c for c in got if c != "layout"]
    assert cases == list(MESH_CASES[mesh])
    for case in cases:  # tokens, per-row forwards and the accepted-length histogram
        assert got[case] == base[case], (mesh, case)
    # the speculative cases accept some drafts but not all (a test that exercises the commit)
    assert 0 < sum(base["chain"]["hist"][2:]) < sum(base["chain"]["hist"])
    g = {"model=8": 8, "data=2,model=4": 4, "data=8": 1}[mesh]
    lay = got["layout"]
    assert lay["tp_groups"] == g and lay["wqkv_shard"] == [64, (8 + 2 * lay["kv_heads"]) * 8 // g]
    assert lay["kv_heads"] == (8 if g == 8 else 4)  # 4 KV heads repeated for 8 shards, split for 4


@pytest.mark.parametrize("mesh", FLASH_MESHES)
def test_flash_prefix_kernel_per_shard_equals_unsharded(sharded_runs, mesh):
    """attention="flash" on a mesh: Pallas's decode kernel under shard_map (rows on `data`, KV
    heads on `model`, one KV head per shard here) gives the unsharded dense run's outputs."""
    base, got = sharded_runs["unsharded"], sharded_runs[f"flash:{mesh}"]
    for case in FLASH_CASES:
        assert got[case] == base[case], (mesh, case)


def test_two_processes_decode_on_one_mesh_like_one_device(sharded_runs):
    """Multi-host: jax.distributed over two local processes (2 simulated devices each, gloo)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(2)
    cmd = lambda i: [sys.executable, "-m", "tests.sharded_worker", f"process={i}", f"port={port}",  # noqa: E731
                     "data=2,model=2"]  # fmt: skip
    procs = [subprocess.Popen(cmd(i), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in (0, 1)]  # fmt: skip
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outs:  # every process gets the whole result
        got = json.loads(out.strip().splitlines()[-1])
        assert got["processes"] == 2 and got["devices"] == 4
        for case in MULTIHOST_CASES:
            assert got["data=2,model=2"][case] == sharded_runs["unsharded"][case], case


def test_regrouped_params_compute_the_same_model():
    host = random_params(CFG, 0)
    tokens = jnp.asarray([[3, 1, 4, 1, 5, 9, 2, 6]])
    pos, mask = jnp.arange(8)[None], causal_mask(1, 8)
    ref, _, _ = forward(to_device(host, CFG, "plain"), CFG, tokens, pos, None, mask)
    for g in (2, 4, 8):  # 8: KV heads repeated twice
        cfg, rep = sharding.tp_config(CFG, g)
        got, _, _ = forward(to_device(sharding.regroup(host, CFG, g, rep), cfg, "plain"), cfg, tokens, pos,
                            None, mask)  # fmt: skip
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # negative control: the grouped split over weights left in the checkpoint layout is another model
    cfg4, _ = sharding.tp_config(CFG, 4)
    wrong, _, _ = forward(to_device(host, cfg4, "plain"), cfg4, tokens, pos, None, mask)
    assert np.abs(np.asarray(wrong) - np.asarray(ref)).max() > 1e-2


def test_mesh_errors_name_the_problem_and_the_fix():
    with pytest.raises(sharding.MeshError, match="num_heads=8.*use model= one of"):
        sharding.tp_config(CFG, 3)
    with pytest.raises(sharding.MeshError, match="expected data=N,model=M"):
        sharding.parse_mesh("data=2,tensor=4")
    with pytest.raises(sharding.MeshError, match=r"needs 64 devices.*xla_force_host_platform_device_count"):
        sharding.parse_mesh("data=8,model=8")
    assert sharding.parse_mesh("") is None and sharding.parse_mesh("data=1").shape == {"data": 1, "model": 1}
    params = to_device(random_params(CFG, 0), CFG)
    mesh = sharding.make_mesh(1, 1)
    with pytest.raises(sharding.MeshError, match="grouped for a model axis of 2"):
        generate(params, CFG.replace(tp_groups=2), [[1, 2]], max_new_tokens=2, mesh=mesh)
    out = generate(*sharding.shard_params(random_params(CFG, 0), CFG, mesh), [[1, 2]], max_new_tokens=3,
                   mesh=mesh)  # fmt: skip
    assert out.tokens == generate(params, CFG, [[1, 2]], max_new_tokens=3).tokens  # the 1×1 mesh


def _sharded_folder(path, *, layers=8, d=512, inter=2048, vocab=1024, heads=8, kv=4):
    """A synthetic HF Llama folder saved as three safetensors shards plus the index."""
    from safetensors.numpy import save_file

    from tests.conftest import _tiny_tokenizer

    rng = np.random.default_rng(0)
    dh = d // heads
    w = lambda *s: rng.normal(0, 0.05, s).astype(np.float32)  # noqa: E731
    tensors = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32),
               "lm_head.weight": w(vocab, d)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "input_layernorm.weight": np.ones(d, np.float32),
                    p + "post_attention_layernorm.weight": np.ones(d, np.float32),
                    p + "self_attn.q_proj.weight": w(heads * dh, d),
                    p + "self_attn.k_proj.weight": w(kv * dh, d),
                    p + "self_attn.v_proj.weight": w(kv * dh, d),
                    p + "self_attn.o_proj.weight": w(d, heads * dh),
                    p + "mlp.gate_proj.weight": w(inter, d), p + "mlp.up_proj.weight": w(inter, d),
                    p + "mlp.down_proj.weight": w(d, inter)}  # fmt: skip
    names = sorted(tensors)
    index = {}
    for j in range(3):
        part = {n: tensors[n] for n in names[j::3]}
        fname = f"model-{j + 1:05d}-of-00003.safetensors"
        save_file(part, str(path / fname))
        index |= dict.fromkeys(part, fname)
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False, "eos_token_id": 1}))  # fmt: skip
    _tiny_tokenizer(vocab).save_pretrained(path)
    return sum(t.nbytes for t in tensors.values()), 2 * inter * d * 4  # model bytes, largest fused param


def test_sharded_loading_streams_one_tensor_at_a_time(tmp_path):
    import tracemalloc

    from specdec.loading import load_model

    total, largest = _sharded_folder(tmp_path)
    mesh = sharding.make_mesh(1, 1)

    def peak(**kw):
        tracemalloc.start()
        loaded = load_model(tmp_path, **kw)
        got = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return got, loaded

    load_model(tmp_path, mesh=mesh)  # imports and tokenizer caches first: they are not the params
    host_peak, host = peak()
    stream_peak, streamed = peak(mesh=mesh)
    assert host_peak > total  # negative control: the plain load holds the whole model on the host
    # streamed: the largest fused tensor, its transfer copy and some slack — not the model (15x it)
    assert stream_peak < 4 * largest < total / 3, (stream_peak, largest, total)
    assert sharding.on_mesh(streamed.params["layers"][0]["wqkv"], mesh)
    params, cfg = sharding.device_params(streamed.params, streamed.cfg, mesh)
    ref = generate(*sharding.device_params(host.params, host.cfg), [[3, 4, 5]], max_new_tokens=4).tokens
    assert generate(params, cfg, [[3, 4, 5]], max_new_tokens=4, mesh=mesh).tokens == ref
