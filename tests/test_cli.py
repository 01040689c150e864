"""specdec-generate end to end (subprocess) on a tiny HF folder: flags, JSON output, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import build_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_llama")
    build_tiny("llama", path)
    return path


def _cli(*args):
    cmd = [sys.executable, "-m", "specdec.cli.generate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1",
                          "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"})  # fmt: skip


def test_generate_json_ar_and_speculative(tiny_folder):
    base = [
        "--target",
        str(tiny_folder),
        "--raw",
        "--prompt",
        "t5 t6 t7 t5 t6",
        "--max_new_tokens",
        "6",
        "--json",
    ]
    ar = _cli(*base)
    assert ar.returncode == 0, ar.stderr[-2000:]
    ar_out = json.loads(ar.stdout.strip().splitlines()[-1])
    assert ar_out["new_tokens"] == len(ar_out["tokens"]) <= 6 and ar_out["tau"] == 1.0
    spec = _cli(*base, "--drafter", "layerskip:1", "--tree", "chain:3", "--verifier", "greedy")
    assert spec.returncode == 0, spec.stderr[-2000:]
    spec_out = json.loads(spec.stdout.strip().splitlines()[-1])
    assert spec_out["tokens"] == ar_out["tokens"]  # greedy: lossless
    assert {"tau", "steps", "accepted_hist", "tokens_per_s", "seconds"} <= set(spec_out)


def test_generate_bad_target_and_tree(tiny_folder, tmp_path):
    missing = _cli("--target", str(tmp_path / "nope"), "--raw", "--prompt", "t1")
    assert missing.returncode != 0 and "not found" in missing.stderr
    bad_tree = _cli(
        "--target", str(tiny_folder), "--raw", "--prompt", "t1", "--drafter", "ngram", "--tree", "bush:3"
    )
    assert bad_tree.returncode != 0 and "chain:" in bad_tree.stderr  # the error lists the valid forms
