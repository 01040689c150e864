"""specdec-eval: Spec-Bench metric formulas, question files, and a tiny end-to-end run."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import pytest

from specdec.eval.methods import Method
from specdec.eval.metrics import (
    TurnRecord,
    acceptance_per_depth,
    first_difference,
    mean_accepted,
    mean_std,
    mismatches,
    question_speeds,
    summarize,
    tau,
    throughput,
)
from specdec.eval.questions import QuestionFileError, load_questions, select
from specdec.verifiers import Verdict


def rec(run, qid, cat, turn, new, sec, *, steps=None, step_tokens=None, tokens=(), call=0):
    """A hand-made turn record; by default AR-like (one token per forward after the prefill's)."""
    st = new - 1 if step_tokens is None else step_tokens
    return TurnRecord(run, qid, cat, turn, new, sec, st if steps is None else steps, st, tuple(tokens),
                      call=call)  # fmt: skip


# ---------------------------------------------------------------------------------------------- metrics


def test_speed_is_per_question_sum_over_turns_and_speedup_is_a_ratio_of_means():
    base = [rec(0, 1, "a", 0, 100, 10.0), rec(0, 2, "a", 0, 20, 0.5), rec(0, 2, "a", 1, 10, 0.5)]
    meth = [rec(0, 1, "a", 0, 100, 5.0), rec(0, 2, "a", 0, 20, 0.3), rec(0, 2, "a", 1, 10, 0.3)]
    assert question_speeds(base) == {(0, 1): 10.0, (0, 2): 30.0}  # Σ tokens / Σ time over turns
    assert question_speeds(meth) == pytest.approx({(0, 1): 20.0, (0, 2): 50.0})
    s = summarize(meth, base)["overall"]
    assert s["baseline_tokens_per_s"] == pytest.approx(20.0)
    assert s["method_tokens_per_s"] == pytest.approx(35.0)
    assert s["speedup"] == pytest.approx(35.0 / 20.0)  # not the mean of ratios (2 and 5/3)
    assert s["speedup"] != pytest.approx((2.0 + 50.0 / 30.0) / 2)


def test_tau_counts_the_bonus_token_and_ar_is_one():
    ar = [rec(0, 1, "a", 0, 10, 1.0), rec(0, 1, "a", 1, 5, 1.0)]  # 9 + 4 tokens from 9 + 4 forwards
    assert tau(ar) == 1.0
    # 3 forwards emitting 3 + 2 + 4 tokens (each includes its bonus token), plus the prefill's token
    spec = [rec(0, 1, "a", 0, 10, 1.0, steps=3, step_tokens=9)]
    assert tau(spec) == 3.0
    pooled = spec + [rec(0, 2, "a", 0, 4, 1.0, steps=3, step_tokens=3)]
    assert tau(pooled) == pytest.approx(12 / 6)  # pooled Σ tokens / Σ forwards, not a mean of τs


def test_acceptance_per_depth_reads_the_accepted_length_histogram():
    hist = [0, 5, 3, 2]  # 10 steps: 5 accepted nothing, 3 one draft, 2 two drafts
    a = acceptance_per_depth(hist)
    assert a == pytest.approx([0.5, 0.2])  # reached depth 1: 5 of 10; depth 2: 2 of 10
    assert 1 + sum(a) == pytest.approx(mean_accepted(hist))  # τ = 1 + Σ a(d)
    assert acceptance_per_depth([]) == [] and acceptance_per_depth([0, 4]) == []


def test_per_category_grouping_and_mean_std_over_runs():
    base, meth = [], []
    for run, k in ((0, 2.0), (1, 4.0)):  # run 1: method twice as fast, run 2: four times
        for qid, cat in ((1, "math"), (2, "math"), (3, "coding")):
            base.append(rec(run, qid, cat, 0, 10, 1.0))
            meth.append(rec(run, qid, cat, 0, 10, 1.0 / k, steps=3, step_tokens=9))
    s = summarize(meth, base)
    assert list(s["per_category"]) == ["math", "coding"]
    assert s["per_category"]["math"]["n_questions"] == 2
    assert s["per_category"]["coding"]["n_questions"] == 1
    assert s["overall"]["speedup"] == pytest.approx(3.0)
    assert s["overall"]["speedup_std"] == pytest.approx(2**0.5)  # ddof=1 over runs {2, 4}
    assert s["per_category"]["coding"]["speedup"] == pytest.approx(3.0)
    assert s["overall"]["tau"] == 3.0 and s["overall"]["baseline_tau"] == 1.0
    assert mean_std([5.0]).std is None and mean_std([1.0, 3.0]).fmt(1) == "2.0 ± 1.4"


def test_lossless_check_and_batched_throughput():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2  # a shorter answer differs where it stops
    base = [rec(0, 1, "a", 0, 3, 1.0, tokens=[1, 2, 3]), rec(0, 1, "a", 1, 2, 1.0, tokens=[4, 5])]
    meth = [rec(0, 1, "a", 0, 3, 1.0, tokens=[1, 2, 3]), rec(0, 1, "a", 1, 2, 1.0, tokens=[4, 6])]
    assert mismatches(meth, base) == [{"run": 0, "question_id": 1, "turn": 1, "first_diff": 1}]
    assert summarize(meth, base)["overall"]["lossless_mismatches"] == 1
    # two rows of one batched call share its 2 s: throughput counts the call once
    batched = [rec(0, 1, "a", 0, 10, 2.0, call=1), rec(0, 2, "a", 0, 30, 2.0, call=1)]
    assert throughput(batched) == 20.0


# -------------------------------------------------------------------------------------------- questions


def test_bundled_mt_bench_and_deterministic_subsets():
    qs = load_questions("mt_bench")
    assert len(qs) == 80 and all(len(q.turns) == 2 for q in qs)
    sub = select(qs, per_category=2)
    assert [q.question_id for q in sub][:4] == [81, 82, 91, 92] and len(sub) == 16
    assert [q.question_id for q in select(qs, categories=["math", "coding"], per_category=1)] == [111, 121]
    assert len(select(qs, limit=5)) == 5


def _write(tmp_path, lines, name="q.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_bad_question_files_and_selections_fail_clearly(tmp_path):
    good = '{"question_id": 1, "category": "math", "turns": ["t3 t4"]}'
    p = _write(tmp_path, [good, '{"question_id": 2, "category": "math", "turns": ['])
    with pytest.raises(QuestionFileError, match=rf"{p.name}:2: not valid JSON"):
        load_questions(str(p))
    p = _write(tmp_path, [good, "", '{"question_id": 3, "turns": ["x"]}'])
    with pytest.raises(QuestionFileError, match=r":3: missing field\(s\) \['category'\]"):
        load_questions(str(p))
    p = _write(tmp_path, ['{"question_id": 1, "category": "math", "turns": []}'])
    with pytest.raises(QuestionFileError, match=r":1: turns must be a non-empty list"):
        load_questions(str(p))
    p = _write(tmp_path, [good, good])
    with pytest.raises(QuestionFileError, match=r":2: duplicate question_id 1"):
        load_questions(str(p))
    with pytest.raises(QuestionFileError, match="neither a bundled benchmark"):
        load_questions(str(tmp_path / "missing.jsonl"))
    qs = load_questions("mt_bench")
    with pytest.raises(QuestionFileError, match=r"unknown category \['poetry'\].*valid categories: writing"):
        select(qs, categories=["poetry"])
    with pytest.raises(QuestionFileError, match="selection .* is empty"):
        select(qs, limit=0)
    with pytest.raises(QuestionFileError, match="selection .* is empty"):
        select(qs, per_category=0)


def test_spec_bench_question_files_load_as_is(tmp_path):
    """Spec-Bench's RAG questions carry a list of lists as reference, others extra fields: kept."""
    recs = [
        {"question_id": 1, "category": "rag", "turns": ["q"], "reference": [["doc a", "doc b"], ["c"]]},
        {"question_id": "x2", "category": "qa", "turns": ["q2"], "reference": {"k": 1}, "source": "nq",
         "meta": [1, {"a": None}]},
        {"question_id": 3, "category": "math_reasoning", "turns": ["q3"], "reference": None},
    ]  # fmt: skip
    p = _write(tmp_path, [json.dumps(r) for r in recs])
    qs = load_questions(str(p))
    assert qs[0].reference == [["doc a", "doc b"], ["c"]] and qs[1].reference == {"k": 1}
    assert qs[1].extra == {"source": "nq", "meta": [1, {"a": None}]} and qs[2].reference is None


def test_method_strings():
    m = Method.parse("layerskip:6|dynamic:depth=3,topk=2,n=8|auto")
    assert (m.drafter, m.tree, m.verifier) == ("layerskip:6", "dynamic:depth=3,topk=2,n=8", "auto")
    assert Method.parse("ngram").label == "ngram|chain:4|auto"
    assert Method.parse("none").drafter is None
    assert Method.parse("ngram|chain:4|typical").lossless is False
    assert m.model_id("smollm2") == "smollm2-layerskip6-dynamicdepth3_topk2_n8-auto"
    for bad in ("", "ngram||auto", "a|b|c|d", "none|chain:2"):
        with pytest.raises(ValueError, match="method"):
            Method.parse(bad)


# ------------------------------------------------------------------------------------------- end to end


def accept_everything(tree, target_logits, key, sampling):
    """A deliberately LOSSY verifier for chains: accepts every valid drafted node unchecked."""
    del key, sampling
    b = tree.tokens.shape[0]
    # a chain: node i sits at depth i, so the valid nodes are 0..n_acc
    n_acc = (jnp.sum(tree.valid & (tree.tokens >= 0), axis=1) - 1).astype(jnp.int32)
    d = jnp.arange(tree.max_depth + 1, dtype=jnp.int32)[None, :]
    path = jnp.where(d <= n_acc[:, None], d, 0)
    nxt = jnp.argmax(target_logits[jnp.arange(b), n_acc], axis=-1).astype(jnp.int32)
    return Verdict(path=path, n_accepted=n_acc, next_token=nxt)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF folder, LoadedModel, question file) of a 2-layer random Llama with a word-level tokenizer."""
    from specdec.loading import load_hf_folder
    from tests.conftest import write_tiny

    path = tmp_path_factory.mktemp("tiny_eval")
    write_tiny("llama", path, layers=2, seed=3)
    qs = [
        {"question_id": 7, "category": "math", "turns": ["t5 t9 t12", "t30 t31"], "reference": ["t4"]},
        {"question_id": 8, "category": "math", "turns": ["t40 t41 t42", "t8"]},
        {"question_id": "w1", "category": "writing", "turns": ["t60 t61 t62 t63", "t70 t71"]},
    ]
    qfile = path / "question.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return path, load_hf_folder(path), qfile


def test_cli_end_to_end_writes_every_output(tiny, tmp_path, capsys):
    from specdec.eval.cli import evaluate
    from specdec.eval.report import PLOTS

    path, model, qfile = tiny
    out = tmp_path / "out"  # on the 1×1 mesh: the sharded path end to end
    argv = ["specdec-eval", f"--bench={qfile}", f"--target={path}", "--raw", "--drafter=layerskip:1",
            "--tree=chain:3", "--max_new_tokens=6", "--per_category=1", f"--out={out}",
            "--noprogress", "--mesh=data=1,model=1"]  # fmt: skip
    m = evaluate(argv, model=model)
    names = sorted(p.name for p in (out / "model_answer").glob("*.jsonl"))
    assert names == [f"{path.name}-baseline.jsonl", f"{path.name}-layerskip1-chain3-auto.jsonl"]
    for name in ("metrics.json", "report.md", *PLOTS):
        assert (out / name).stat().st_size > 0, name
    for f in (out / "model_answer").glob("*.jsonl"):  # FastChat's model_answer schema
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        assert [r["question_id"] for r in rows] == [7, "w1"]
        for r in rows:
            assert {"question_id", "answer_id", "model_id", "choices", "tstamp"} <= set(r)
            (choice,) = r["choices"]
            assert choice["index"] == 0 and len(choice["turns"]) == 2
            assert all(isinstance(t, str) for t in choice["turns"])
    disk = json.loads((out / "metrics.json").read_text())
    for key in ("speedup", "tau", "method_tokens_per_s", "baseline_tokens_per_s", "per_category",
                "lossless_mismatches", "compile_seconds", "config", "machine"):  # fmt: skip
        assert key in disk, key
    assert disk["lossless_mismatches"] == 0 and m["lossless_checked"]
    assert disk["config"]["mesh"] == "data=1,model=1"
    assert list(disk["per_category"]) == ["math", "writing"]
    assert {"speedup", "tau"} <= set(disk["per_category"]["math"])
    assert disk["speedup"] > 0 and disk["tau"] >= 1.0
    method = disk["methods"]["layerskip:1|chain:3|auto"]
    assert method["timed_compiles"] == 0 and disk["baseline"]["timed_compiles"] == 0
    assert sum(method["accepted_hist"]) > 0
    a = method["acceptance_per_depth"]
    assert len(a) == 3 and 1 + sum(a) == pytest.approx(method["mean_accepted"])  # chain:3
    assert "| a(1) | a(2) | a(3) |" in (out / "report.md").read_text()
    assert disk["machine"]["cpu_count"] >= 1 and len(disk["machine"]["loadavg_samples"]) == 2
    printed = capsys.readouterr().out
    assert "| **overall** |" in printed and str(out / "report.md") in printed


def test_compare_shared_baseline_flags_a_lossy_verifier(tiny):
    from specdec.eval.mtbench import EvalConfig, run_eval
    from specdec.eval.report import build_metrics, tables

    path, model, qfile = tiny
    good = Method("layerskip:1", "chain:3", "auto")
    bad = Method("layerskip:1", "chain:3", accept_everything)
    cfg = EvalConfig(bench=str(qfile), target=str(path), methods=(good, bad), max_new_tokens=6,
                     per_category=None, limit=2, batch_size=2, raw=True, warmup_runs=0)  # fmt: skip
    res = run_eval(cfg, model=model, progress=False)
    assert res.labels == ["baseline", good.label, "layerskip:1|chain:3|accept_everything"]
    assert {r.batch_size for r in res.records["baseline"]} == {2}
    m = build_metrics(res)
    assert m["methods"][good.label]["lossless_mismatches"] == 0
    lossy = m["methods"][bad.label]
    assert lossy["lossless_mismatches"] > 0 and lossy["verifier_lossless"] is None
    assert lossy["mismatch_details"][0]["first_diff"] >= 0
    table = tables(m)
    assert r"m1 = `layerskip:1\|chain:3\|auto`; m2 = `layerskip:1\|chain:3\|accept_everything`" in table


def test_compiled_programs_are_cleared_near_the_map_limit(tiny, monkeypatch, caplog):
    """Near vm.max_map_count the runner drops compiled programs (named once in the log) instead of
    letting the next compile crash; they recompile untimed and the answers are unchanged."""
    import logging

    from specdec.eval import mtbench

    path, model, qfile = tiny
    method = Method("layerskip:1", "chain:3")
    cfg = mtbench.EvalConfig(bench=str(qfile), target=str(path), methods=(method,), max_new_tokens=6,
                             per_category=None, limit=2, raw=True, warmup_runs=0)  # fmt: skip
    calm = mtbench.run_eval(cfg, model=model, progress=False)
    assert calm.cache_clears == 0
    monkeypatch.setattr(mtbench, "memory_maps", lambda: (61_000, 65_530))
    with caplog.at_level(logging.WARNING, logger="specdec"):
        full = mtbench.run_eval(cfg, model=model, progress=False)
    assert full.cache_clears >= 2 and sum(full.timed_compiles.values()) == 0
    assert len(caplog.records) == 1 and "vm.max_map_count=65530" in caplog.records[0].message
    assert full.answers == calm.answers


def test_runner_input_errors(tiny):
    from specdec.eval.mtbench import EvalConfig, run_eval

    path, model, qfile = tiny
    with pytest.raises(ValueError, match="no chat template; run with --raw"):
        run_eval(EvalConfig(bench=str(qfile), target=str(path)), model=model, progress=False)
    with pytest.raises(QuestionFileError, match="unknown category"):
        run_eval(EvalConfig(bench=str(qfile), categories=("poetry",), raw=True), model=model, progress=False)
    with pytest.raises(ValueError, match="method 'ngram\\|chain:zz\\|auto'"):
        run_eval(EvalConfig(bench=str(qfile), methods=(Method("ngram", "chain:zz"),), raw=True),
                 model=model, progress=False)  # fmt: skip


def test_interrupted_eval_resumes_and_a_changed_configuration_is_refused(tiny, tmp_path, monkeypatch):
    """Kill after the first question, rerun: finished questions are skipped (and said so), the totals
    cover the same questions as an uninterrupted run; another configuration is refused."""
    from specdec.eval import journal as journal_module
    from specdec.eval import mtbench
    from specdec.eval.mtbench import EvalConfig, run_eval

    path, model, qfile = tiny
    cfg = EvalConfig(bench=str(qfile), target=str(path), methods=(Method("layerskip:1", "chain:3"),),
                     max_new_tokens=5, per_category=None, raw=True, warmup_runs=0)  # fmt: skip
    whole = run_eval(cfg, model=model, progress=False)
    journal = tmp_path / "progress.jsonl"
    real, calls = mtbench._restore, []

    class Killed(Exception):
        pass

    append = journal_module.Journal.append

    def append_then_die(self, rec):
        append(self, rec)
        raise Killed

    monkeypatch.setattr(journal_module.Journal, "append", append_then_die)
    with pytest.raises(Killed):
        run_eval(cfg, model=model, progress=False, journal=journal)
    monkeypatch.setattr(journal_module.Journal, "append", append)
    with journal.open("a") as f:
        f.write('{"run": 0, "question_ids": [8], "lab')  # a line cut off by the kill
    monkeypatch.setattr(mtbench, "_restore", lambda *a: calls.append(a[2]) or real(*a))
    res = run_eval(cfg, model=model, progress=False, journal=journal)
    assert calls == [0] and res.resumed_batches == 1  # question 7 restored, 8 and w1 rerun
    for lab in res.labels:
        key = lambda r: (r.run, str(r.question_id), r.turn)  # noqa: E731
        got, want = sorted(res.records[lab], key=key), sorted(whole.records[lab], key=key)
        assert [key(r) for r in got] == [key(r) for r in want]
        assert [r.tokens for r in got] == [r.tokens for r in want]  # greedy: the same answers
        assert res.answers[lab] == whole.answers[lab] and res.hists[lab] == whole.hists[lab]
    assert len(journal.read_text().splitlines()) == 4  # header + 3 batches, the cut line dropped
    again = run_eval(cfg, model=model, progress=False, journal=journal)  # all done: nothing rerun
    assert again.resumed_batches == 3
    other = dataclasses.replace(cfg, max_new_tokens=6)
    with pytest.raises(ValueError, match=r"another configuration \(differs in: max_new_tokens\).*--restart"):
        run_eval(other, model=model, progress=False, journal=journal)
    fresh = run_eval(other, model=model, progress=False, journal=journal, restart=True)
    assert fresh.resumed_batches == 0


def test_num_samples_share_each_prompt_and_all_count(tiny, tmp_path):
    from specdec.eval.mtbench import EvalConfig, run_eval
    from specdec.eval.report import build_metrics

    path, model, _ = tiny
    from specdec.chat import raw_ids
    from specdec.prefix_sharing import plan_sharing

    long_turn = " ".join(f"t{5 + i % 50}" for i in range(55))
    assert plan_sharing([raw_ids(model.tokenizer, long_turn)] * 3) is not None  # long enough to share
    qfile = tmp_path / "long.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "category": "math", "turns": [long_turn, "t8 t9"]}) + "\n")
    runs = {}
    for mode in ("auto", "off"):
        cfg = EvalConfig(bench=str(qfile), target=str(path), methods=(Method("layerskip:1", "chain:3"),),
                         max_new_tokens=5, per_category=None, raw=True, warmup_runs=0, num_samples=3,
                         shared_prefix=mode)  # fmt: skip
        runs[mode] = run_eval(cfg, model=model, progress=False)
    on, off = runs["auto"], runs["off"]
    assert on.answers == off.answers  # greedy: sharing changes no token
    rec = on.records["baseline"]
    assert [r.turn for r in rec] == [0, 1] and all(r.new_tokens == 3 * len(r.tokens) for r in rec)
    m = build_metrics(on)
    assert m["methods"]["layerskip:1|chain:3|auto"]["lossless_mismatches"] == 0
