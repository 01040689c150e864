"""Bad input refused up front, in one line naming the problem and the fix: sampling options (in
`SamplingConfig` and on every CLI), damaged drafter checkpoints, an --out that is a file."""

from __future__ import annotations

import json
import math
import shutil
import sys

import pytest

from tests.conftest import write_tiny


def _console(monkeypatch, capsys, run, *argv):
    """Run a console entry point in-process: (exit code, its `prog: error:` lines, stderr)."""
    monkeypatch.setenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # what quiet_start sets, undone after
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(SystemExit) as e:
        run()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-2000:]
    return e.value.code, [x for x in err.splitlines() if x.startswith(f"{argv[0]}: error: ")], err


# ---- sampling options --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, needle",
    [
        (dict(temperature=math.nan), "temperature must be a finite number >= 0, got nan"),
        (dict(temperature=math.inf), "temperature must be a finite number >= 0, got inf"),
        (dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
        (dict(temperature="0.7"), "temperature must be a finite number >= 0"),
        (dict(temperature=1e-40), "use 0 for greedy"),
        (dict(top_k=-1), "top_k must be a whole number >= 0"),
        (dict(top_k=2.5), "top_k must be a whole number >= 0"),
        (dict(top_p=math.nan), "top_p must be in (0, 1]"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
    ],
)
def test_sampling_config_refuses_bad_options(kw, needle):
    from specdec.sampling import SamplingConfig

    with pytest.raises(ValueError) as e:
        SamplingConfig(**kw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_sampling_config_accepts_the_valid_range():
    import numpy as np

    from specdec.sampling import MIN_TEMPERATURE, SamplingConfig

    ok = [
        dict(), dict(temperature=1), dict(temperature=MIN_TEMPERATURE), dict(temperature=2.0, top_k=5),
        dict(temperature=np.float32(0.7), top_k=np.int64(3), top_p=0.9), dict(temperature=1.0, top_p=1),
    ]  # fmt: skip
    for kw in ok:
        SamplingConfig(**kw)


def test_every_cli_refuses_bad_sampling_options_before_loading(monkeypatch, capsys, tmp_path):
    from specdec.cli.generate import run as generate
    from specdec.eval.cli import run as evaluate
    from specdec.train.cli import run as train

    missing = str(tmp_path / "no_such_model")  # never reached: the flags are refused first
    g, e, t = (generate, "specdec-generate"), (evaluate, "specdec-eval"), (train, "specdec-train")
    nan_t = "--temperature must be a finite number >= 0, got nan"
    r = ["--out", str(tmp_path / "r")]
    cases = [
        (g, ["--temperature", "nan"], nan_t),
        (g, ["--temperature", "inf"], "--temperature must be a finite number >= 0, got inf"),
        (g, ["--top_p", "nan"], "--top_p must be in (0, 1]"),
        (g, ["--top_p", "0"], "--top_p must be in (0, 1]"),
        (e, ["--temperature", "nan"], nan_t),
        (e, ["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (t, [*r, "--regenerate_temperature", "nan"], "--regenerate_" + nan_t[2:]),
        (t, [*r, "--regenerate_top_p", "2"], "--regenerate_top_p must be in (0, 1]"),
        (t, [*r, "--lr", "nan"], "--lr must be a finite number"),
    ]
    for (run, prog), args, needle in cases:
        code, lines, err = _console(monkeypatch, capsys, run, prog, "--target", missing, *args)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (prog, args, err[-1500:])
    assert not (tmp_path / "r").exists()  # nothing was started


# ---- --out naming a file ---------------------------------------------------------------------------


def test_out_naming_a_file_is_refused_before_loading(monkeypatch, capsys, tmp_path):
    from specdec.eval.cli import run as evaluate
    from specdec.train.cli import run as train

    f = tmp_path / "results.txt"
    f.write_text("keep me")
    missing = str(tmp_path / "no_such_model")
    cases = [
        (evaluate, "specdec-eval", ["--out", str(f)],
         f"--out {f} is an existing file; --out names a folder (results are written inside it)"),
        (evaluate, "specdec-eval", ["--out", str(f / "sub")], f"{f} is an existing file"),
        (train, "specdec-train", ["--out", str(f)], f"--out {f} is an existing file; --out names a folder"),
        (train, "specdec-train", ["--out", str(tmp_path / "r"), "--features", str(f)],
         f"--features {f} is an existing file"),
        (train, "specdec-train", ["--out", str(tmp_path / "r"), "--export_regenerated", str(f)],
         f"--export_regenerated {f} is an existing file"),
    ]  # fmt: skip
    for run, prog, args, needle in cases:
        code, lines, err = _console(monkeypatch, capsys, run, prog, "--target", missing, *args)
        assert code == 2 and len(lines) == 1 and needle in lines[0], (prog, args, err[-1500:])
    assert f.read_text() == "keep me"


# ---- damaged drafter checkpoints ----------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_eagle():
    from specdec.drafters import shipped_path

    path = shipped_path("eagle")
    if not (path / "drafter.json").is_file():
        pytest.skip("shipped drafters not installed")
    return path


NO_PARAMS_META = '{"format": "specdec-drafter", "family": "eagle"}'  # no config, no target


def _damaged(tmp_path, shipped, edit=None, *, params="copy", meta="copy"):
    folder = tmp_path / "drafter"
    folder.mkdir()
    if meta == "copy":
        m = json.loads((shipped / "drafter.json").read_text())
        if edit is not None:
            m = edit(m)
        (folder / "drafter.json").write_text(json.dumps(m))
    elif meta is not None:
        (folder / "drafter.json").write_text(meta)
    if params == "copy":
        shutil.copy(shipped / "params.safetensors", folder / "params.safetensors")
    elif params == "empty":
        (folder / "params.safetensors").write_bytes(b"")
    elif params == "truncated":
        (folder / "params.safetensors").write_bytes((shipped / "params.safetensors").read_bytes()[:1000])
    return folder


def _without(*keys):
    def edit(m):
        d = m
        for k in keys[:-1]:
            d = d[k]
        del d[keys[-1]]
        return m

    return edit


@pytest.mark.parametrize(
    "how, needles",
    [
        (dict(meta=NO_PARAMS_META), ["drafter.json", "'config' is missing"]),
        (dict(edit=_without("target")), ["drafter.json", "'target' is missing"]),
        (dict(edit=_without("config", "hidden_size")), ["drafter.json", "lacks hidden_size"]),
        (dict(edit=_without("target", "fingerprint")), ["drafter.json", "'fingerprint' is missing"]),
        (dict(edit=lambda m: {**m, "family": "eagle9"}), ["drafter.json", "unknown drafter family 'eagle9'"]),
        (dict(edit=lambda m: {**m, "format": "other"}), ["drafter.json", "is not a specdec-drafter file"]),
        (dict(meta=""), ["drafter.json is empty"]),
        (dict(meta="{not json"), ["drafter.json is unreadable"]),
        (dict(meta=None), ["drafter.json is missing"]),
        (dict(params=None), ["params.safetensors is missing"]),
        (dict(params="empty"), ["params.safetensors is empty"]),
        (dict(params="truncated"), ["params.safetensors is corrupt"]),
    ],
)
def test_damaged_drafter_checkpoints_name_the_file_problem_and_fix(tmp_path, shipped_eagle, how, needles):
    from specdec.drafters.checkpoint import DrafterCheckpointError, read

    folder = _damaged(tmp_path, shipped_eagle, **how)
    with pytest.raises(DrafterCheckpointError) as e:
        read(folder)
    msg = str(e.value)
    assert str(folder) in msg and "\n" not in msg, msg
    assert all(n in msg for n in needles), msg
    if "not a specdec-drafter file" not in msg:
        assert "re-train it with specdec-train or re-copy" in msg, msg


def test_shipped_drafters_pass_the_checks():
    from specdec.drafters import shipped_path
    from specdec.drafters.checkpoint import FAMILIES, MODEL_FAMILIES, read

    root = shipped_path("eagle").parent
    folders = sorted(p for p in root.iterdir() if (p / "drafter.json").is_file()) if root.is_dir() else []
    if not folders:
        pytest.skip("shipped drafters not installed")
    for folder in folders:
        meta, params = read(folder)
        assert meta["family"] in FAMILIES and params or meta["family"] in MODEL_FAMILIES and params["accept"]


def test_generate_with_a_damaged_drafter_is_one_line(tmp_path, shipped_eagle, monkeypatch, capsys):
    from specdec.cli.generate import run as generate

    target = tmp_path / "target"
    write_tiny("llama", target)
    folder = _damaged(tmp_path, shipped_eagle, meta=NO_PARAMS_META)
    code, lines, err = _console(monkeypatch, capsys, generate, "specdec-generate", "--target", str(target),
                                "--raw", "--prompt", "t5 t6", "--drafter", str(folder))  # fmt: skip
    assert code == 2 and len(lines) == 1, err[-1500:]
    assert f"{folder}/drafter.json" in lines[0] and "'config' is missing" in lines[0]
    assert "re-train" in lines[0]
