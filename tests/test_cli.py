"""specdec-generate end to end (subprocess) on a tiny HF folder: flags, JSON output, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import write_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_llama")
    write_tiny("llama", path)
    return path


def _cli(*args):
    """The console script in a fresh process (the suite's XLA flags: compile fast)."""
    cmd = [sys.executable, "-m", "specdec.cli.generate", *args]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


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
    # speculative on a 1×1 mesh (the --mesh path end to end)
    spec = _cli(*base, "--drafter", "layerskip:1", "--tree", "chain:3", "--verifier", "greedy", "--mesh",
                "data=1,model=1")  # fmt: skip
    assert spec.returncode == 0, spec.stderr[-2000:]
    spec_out = json.loads(spec.stdout.strip().splitlines()[-1])
    assert spec_out["tokens"] == ar_out["tokens"]  # greedy: lossless
    assert {"tau", "steps", "accepted_hist", "tokens_per_s", "seconds"} <= set(spec_out)


def test_generate_num_samples_share_the_prompt(tiny_folder):
    prompt = " ".join(f"t{5 + i % 40}" for i in range(80))  # all but its last token shared
    run = _cli("--target", str(tiny_folder), "--raw", "--prompt", prompt, "--max_new_tokens", "6", "--json",
               "--num_samples", "3", "--temperature", "1.0", "--seed", "1")  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    samples = out["samples"]
    assert len(samples) == 3
    assert all(set(s) == {"text", "tokens"} and 1 <= len(s["tokens"]) <= 6 for s in samples)
    assert out["new_tokens"] == sum(len(s["tokens"]) for s in samples)
    assert out["shared_tokens"] == 2 * (out["prompt_tokens"] - 1)
    assert len({tuple(s["tokens"]) for s in samples}) > 1  # sampled apart, from one shared prefill


def _console(monkeypatch, capsys, run, *argv):
    """Run a console entry point in-process; return (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", list(argv))
    with pytest.raises(SystemExit) as e:
        run()
    return e.value.code, capsys.readouterr().err


def test_every_tool_reports_bad_input_in_one_line_with_exit_code_2(
    tiny_folder, tmp_path, monkeypatch, capsys
):
    """`tool: error: ...` on one line, exit status 2, never a traceback: flags, files, data, trees."""
    from specdec.cli.generate import run as generate
    from specdec.eval.cli import run as evaluate
    from specdec.train.cli import run as train

    bad = (tmp_path / "bad.jsonl", '{"question_id": 1, "turns": ["x"]}\n')
    bad[0].write_text(bad[1])
    long_prompt = " ".join(["t5"] * 120)  # the tiny model's context is 128 tokens
    t = str(tiny_folder)
    g, e, tr = (generate, "specdec-generate"), (evaluate, "specdec-eval"), (train, "specdec-train")
    greedy_t1 = ["--target", t, "--raw", "--drafter", "layerskip:1", "--verifier=greedy", "--temperature=1"]
    cases = [
        (g, ["--target", str(tmp_path / "nope"), "--raw"], "not found"),
        (g, ["--target", t, "--raw", "--drafter", "ngram", "--tree", "bush:3"], "chain:"),
        (g, ["--target", t, "--raw", "--drafter", str(tmp_path)], "drafter"),
        (g, ["--target", t, "--raw", "--prompt", long_prompt, "--max_new_tokens", "16"], "model's context"),
        (g, ["--max_new_tokens", "0"], "max_new_tokens"),
        (g, ["--target", t, "--raw", "--drafter", "falcon:conf=0.5"], "takes no option conf="),
        (g, ["--target", t, "--raw", "--drafter", "dflash:block=four"], "dflash:block=4"),
        (g, ["--target", t, "--raw", "--drafter", "amphista"], "--drafter amphista"),  # SmolLM2 only
        (g, ["--bogus_flag"], "bogus_flag"),
        (g, ["--target", t, "--raw", "--mesh", "data=1,model=2"], "needs 2 devices"),
        (g, ["--target", t, "--raw", "--mesh", "model=two"], "data=N,model=M"),
        (g, greedy_t1, "greedy_verify is the temperature-0 verifier"),  # refused before compiling
        (e, ["--bench", str(tmp_path / "missing.jsonl")], "neither a bundled benchmark"),
        (e, ["--bench", str(bad[0])], "missing field"),
        (e, ["--target", t, "--raw", "--compare", "ngram|chain:zz", "--out", str(tmp_path)], "chain:zz"),
        (tr, [], "--out"),
        (tr, ["--target", t, "--out", str(tmp_path / "r"), "--data", str(tmp_path / "x")], "does not exist"),
        (tr, ["--drafter", "falcon9"], "drafter"),
        (tr, ["--out", str(tmp_path / "r2"), "--target_mesh", "model=two"], "data=N,model=M"),
        (tr, ["--out", str(tmp_path / "r3"), "--reuse_features", "x"], "--regenerated DIR"),
        (tr, ["--drafter", "medusa", "--align_steps", "2"], "--align_steps is an option of eagle, not of"),
        (tr, ["--drafter", "eagle", "--ttt_steps", "2"], "--ttt_steps is an option of eagle3, not of eagle"),
        (tr, ["--target", t, "--out", str(tmp_path / "r5"), "--init_from", str(tmp_path)], "drafter.json"),
    ]
    for (run, prog), args, needle in cases:
        code, err = _console(monkeypatch, capsys, run, prog, *args)
        lines = [x for x in err.splitlines() if x.startswith(f"{prog}: error: ")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (prog, args, err[-1500:])
        assert "Traceback" not in err, (prog, args, err[-1500:])


def test_generate_check_and_trace(tiny_folder, tmp_path):
    """--loop python --check --trace: one JSON line per step whose appended tokens are the output."""
    base = ["--target", str(tiny_folder), "--raw", "--prompt", "t5 t6 t7 t5 t6", "--max_new_tokens", "6",
            "--json", "--drafter", "layerskip:1", "--tree", "chain:3"]  # fmt: skip
    run = _cli(*base, "--loop", "python", "--check", "--trace", str(tmp_path / "t.jsonl"))
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    lines = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert len(lines) == out["steps"] and [t for x in lines for t in x["accepted"]] == out["tokens"][1:]


def test_facade_load_speculator_generate(tiny_folder):
    """The public facade: `specdec.load` a folder, bundle a drafter + tree, decode; greedy = AR;
    a bundle and loose drafter arguments together are refused."""
    import specdec

    model = specdec.load(tiny_folder)
    ids = [specdec.raw_ids(model.tokenizer, "t5 t6 t7 t5 t6")]
    ar = specdec.generate(model.params, model.cfg, ids, max_new_tokens=8)
    spec = specdec.speculator(model, "layerskip:1", "chain:3", "target_only")
    out = specdec.generate(model.params, model.cfg, ids, max_new_tokens=8, speculator=spec, check=True)
    assert out.tokens == ar.tokens
    with pytest.raises(specdec.CompositionError, match="not both"):
        specdec.generate(
            model.params, model.cfg, ids, max_new_tokens=8, speculator=spec, drafter=spec.drafter
        )
    with pytest.raises(ValueError, match="no chat template"):
        specdec.chat(model, "hi", speculator=spec)
