"""A normal CLI run prints only what was asked for: no library start-up chatter on stderr, while
specdec's own fallbacks are still named, once."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from tests.conftest import write_tiny

CHATTER = (
    "PyTorch was not found",  # transformers, when torch is not installed (specdec never needs it)
    "Unable to initialize backend",  # JAX, INFO level: "'tpu': ... libtpu.so: cannot open ..."
    "libtpu",
    "xla_bridge",
)

KERNEL_FALLBACK = "specdec: the CPU kernels are not built"

# A run as a user without torch and without the C++ kernels has it: torch and the extension are made
# unimportable before anything is imported. JAX chooses its platforms itself (JAX_PLATFORMS unset).
_RUN = """
import sys
sys.modules["torch"] = None
sys.modules["specdec._cpu_kernels"] = None
from specdec.{module} import run
sys.argv = ["{prog}", *sys.argv[1:]]
run()
"""


def _run(module: str, prog: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRANSFORMERS_", "JAX_PLATFORM"))}
    env["HF_HUB_OFFLINE"] = "1"
    cmd = [sys.executable, "-c", _RUN.format(module=module, prog=prog), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("quiet_llama")
    write_tiny("llama", path)
    return path


def test_generate_prints_no_library_chatter_and_names_the_kernel_fallback_once(tiny_folder):
    args = ["--target", str(tiny_folder), "--raw", "--prompt", "t5 t6 t7", "--max_new_tokens", "3", "--json"]
    r = _run("cli.generate", "specdec-generate", *args)
    assert r.returncode == 0, r.stderr[-3000:]
    device = json.loads(r.stdout.strip().splitlines()[-1])["device"]
    for line in CHATTER:
        assert line not in r.stderr, r.stderr[-3000:]
    named = [x for x in r.stderr.splitlines() if KERNEL_FALLBACK in x]
    assert len(named) == (device == "cpu"), r.stderr[-3000:]  # the CPU kernels only matter on a CPU


def test_an_error_after_loading_is_the_only_line_besides_the_named_fallback(tiny_folder, tmp_path):
    """specdec-eval and specdec-train run under absl's INFO logging (their flags are their own): JAX's
    libtpu line and specdec's INFO timings showed there. A bad --init_from fails after the target
    loads (JAX initialised): stderr is the fallback line and the error, nothing else."""
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("train.cli", "specdec-train", "--target", str(tiny_folder), "--out", str(tmp_path / "run"),
             "--init_from", str(empty))  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    # named fallbacks may show (specdec's kernels on a CPU; JAX's "... Falling back to cpu" on a GPU
    # machine without CUDA jaxlib), once each; nothing else but the error
    rest = [x for x in r.stderr.splitlines() if KERNEL_FALLBACK not in x and "Falling back to" not in x]
    assert len(rest) == 1, r.stderr[-3000:]
    assert rest[0].startswith("specdec-train: error: ") and "drafter.json is missing" in rest[0]
    assert len(r.stderr.splitlines()) - len(rest) <= 2, r.stderr[-3000:]


def test_a_non_float32_model_on_cpu_names_its_fallback_once(caplog):
    import jax

    from specdec import matmul

    if jax.default_backend() != "cpu":
        pytest.skip("the CPU fallback")
    matmul._say_non_f32_on_cpu.cache_clear()
    with caplog.at_level(logging.WARNING, logger="specdec"):
        assert matmul.choose_layout("bfloat16", "cpu") == "plain"
        assert matmul.choose_layout("bfloat16", "cpu") == "plain"
        assert matmul.choose_layout("float32", "gpu") == "plain"  # not a CPU fallback: nothing to say
    named = [r for r in caplog.records if "bfloat16 weights and KV cache on CPU" in r.getMessage()]
    assert len(named) == 1 and named[0].levelno == logging.WARNING
