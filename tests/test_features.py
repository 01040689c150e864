"""The feature cache: extraction equals the target's forward, resumes, records its precision, and
copies sequences that another cache (a regeneration run's) already holds."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from specdec.cache import causal_mask
from specdec.models import forward
from specdec.train import data, features


def test_feature_cache_resumes_and_matches_forward(tiny_cache, tmp_path):
    params, cfg, path, exs, _ = tiny_cache
    fs = features.FeatureSet.open(path)
    assert len(fs) == 40 and fs.manifest["complete"]
    d = fs.seq(17, ["tokens", "top1", "tap_2"])
    n = len(exs[17].tokens)
    logits, taps, _ = forward(params, cfg, jnp.asarray(exs[17].tokens)[None], jnp.arange(n)[None], None,
                              causal_mask(1, n), taps=(2,))  # fmt: skip
    np.testing.assert_array_equal(d["tokens"], exs[17].tokens)
    np.testing.assert_allclose(d["tap_2"], taps[0][0], atol=2e-3, rtol=2e-3)  # float16 storage
    assert (d["top1"] == np.argmax(logits[0], -1)).mean() > 0.95
    # an interrupted extraction (manifest lists one shard of three) resumes and completes
    part = tmp_path / "part"
    features.extract(params, cfg, "tiny", exs[:16], part, taps=(2,), shard_size=16, progress=False)
    m = json.loads((part / "manifest.json").read_text())
    with pytest.raises(features.FeatureCacheError, match="different extraction"):
        features.extract(params, cfg, "tiny", exs, part, taps=(2,), shard_size=16, progress=False)
    m.update(num_examples=40, complete=False)
    (part / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(features.FeatureCacheError, match="interrupted"):
        features.FeatureSet.open(part)
    features.extract(params, cfg, "tiny", exs, part, taps=(2,), shard_size=16, progress=False)
    fs2 = features.FeatureSet.open(part)
    np.testing.assert_array_equal(fs2.seq(39, ["tokens"])["tokens"], exs[39].tokens)


def test_bfloat16_extraction_is_close_and_recorded(tiny_cache, tmp_path):
    params, cfg, path, exs, _ = tiny_cache
    ref = features.FeatureSet.open(path)
    out = tmp_path / "bf16"
    features.extract(params, cfg, "tiny", exs[:8], out, taps=(2,), shard_size=8, matmul_dtype="bfloat16",
                     progress=False)  # fmt: skip
    fs = features.FeatureSet.open(out)
    assert fs.manifest["matmul_dtype"] == "bfloat16"
    got, want = fs.seq(5, ["tap_2", "top1"]), ref.seq(5, ["tap_2", "top1"])
    err = np.linalg.norm(got["tap_2"] - want["tap_2"]) / np.linalg.norm(want["tap_2"])
    assert 1e-5 < err < 2e-2  # the products really ran in bf16, and stayed close
    assert (got["top1"] == want["top1"]).mean() > 0.9
    with pytest.raises(features.FeatureCacheError, match="matmul_dtype"):  # no mixing of precisions
        features.extract(params, cfg, "tiny", exs[:8], out, taps=(2,), shard_size=8, progress=False)


def test_extraction_copies_what_a_reused_cache_holds(tiny_cache, tmp_path):
    """Sequences with the same tokens and loss mask in a `reuse` cache are copied, not recomputed;
    the rest is extracted; a cache of another precision or without the taps is refused."""
    params, cfg, path, exs, _ = tiny_cache
    src = tmp_path / "regen"
    features.extract(params, cfg, "tiny", exs[8:24], src, taps=(1, 2), shard_size=16, progress=False)
    tap = src / "shard_00000" / "tap_2.npy"
    np.save(tap, np.load(tap) + 1)  # marks what is copied from here
    exs2 = list(exs)
    exs2[10] = data.Example(exs[10].tokens, ~exs[10].loss_mask)  # same tokens, other mask: recomputed
    out = tmp_path / "out"
    features.extract(params, cfg, "some/dir/tiny", exs2, out, taps=(2,), shard_size=16, reuse=[src],
                     progress=False)  # fmt: skip
    m = json.loads((out / "manifest.json").read_text())
    held = {}  # the random motifs repeat: equal sequences elsewhere in the list are copied too
    for e in exs[8:24]:
        held.setdefault(e.tokens.tobytes(), e.loss_mask)
    copied = [np.array_equal(held.get(e.tokens.tobytes(), ~e.loss_mask), e.loss_mask) for e in exs2]
    assert not copied[10] and sum(copied[8:24]) == 15
    assert [s["reused"] for s in m["shards"]] == [sum(copied[i : i + 16]) for i in (0, 16, 32)]
    fs, ref = features.FeatureSet.open(out), features.FeatureSet.open(path)
    for s in range(len(exs)):
        got, want = fs.seq(s, ["tap_2", "top1", "loss_mask"]), ref.seq(s, ["tap_2", "top1"])
        np.testing.assert_array_equal(got["loss_mask"], exs2[s].loss_mask)
        np.testing.assert_allclose(got["tap_2"], want["tap_2"] + copied[s], atol=2e-3, rtol=2e-3)
        assert (got["top1"] == want["top1"]).mean() > 0.95
    with pytest.raises(features.FeatureCacheError, match=r"taps \[1, 2\] lack \[0\]"):
        features.extract(params, cfg, "tiny", exs, tmp_path / "o2", taps=(0, 2), reuse=[src], progress=False)
    with pytest.raises(features.FeatureCacheError, match="matmul_dtype float32 vs bfloat16"):
        features.extract(params, cfg, "tiny", exs, tmp_path / "o3", taps=(2,), reuse=[src],
                         matmul_dtype="bfloat16", progress=False)  # fmt: skip


def test_extraction_workers_fill_one_cache(tiny_cache, tmp_path):
    """Two workers (threads here, processes in use) split the shards of one cache under the manifest
    lock: the first to finish leaves it incomplete, the last completes it, and it equals a
    single-process extraction."""
    import threading

    params, cfg, path, exs, _ = tiny_cache
    out, kw = tmp_path / "w", dict(taps=(0, 1, 2), shard_size=8, progress=False)
    features.extract(params, cfg, "tiny", exs, out, worker=(1, 2), **kw)
    m = json.loads((out / "manifest.json").read_text())
    assert sorted(s["index"] for s in m["shards"]) == [1, 3] and not m["complete"]
    with pytest.raises(features.FeatureCacheError, match="interrupted"):
        features.FeatureSet.open(out)
    out2 = tmp_path / "w2"  # both at once: the manifest must keep every worker's shards
    runs = [threading.Thread(target=features.extract, args=(params, cfg, "tiny", exs, out2),
                             kwargs=dict(worker=(w, 2), **kw))
            for w in (0, 1)]  # fmt: skip
    for t in runs:
        t.start()
    for t in runs:
        t.join()
    features.extract(params, cfg, "tiny", exs, out, worker=(0, 2), **kw)
    ref = features.FeatureSet.open(path)
    for o in (out, out2):
        fs = features.FeatureSet.open(o)
        assert fs.manifest["complete"] and sorted(s["index"] for s in fs.manifest["shards"]) == list(range(5))
        for s in (0, 9, 17, 39):
            got, want = fs.seq(s, ["tokens", "tap_1", "top1"]), ref.seq(s, ["tokens", "tap_1", "top1"])
            np.testing.assert_array_equal(got["tokens"], want["tokens"])
            np.testing.assert_array_equal(got["top1"], want["top1"])
            np.testing.assert_allclose(got["tap_1"], want["tap_1"], atol=1e-3)
    with pytest.raises(features.FeatureCacheError, match="index must be in"):
        features.extract(params, cfg, "tiny", exs, out, taps=(0, 1, 2), worker=(2, 2), progress=False)
