"""The MT-Bench / Spec-Bench runner: method(s) and the shared AR baseline on the same questions.

Protocol (Spec-Bench `evaluation/eval.py`, adapted to a jitted JAX loop):
  * prompts go through the target's chat template (or plain text with `raw=True`); turn t's prompt
    holds the configuration's OWN earlier answers (the baseline's for the baseline);
  * the baseline is `specdec.generate.generate` with no drafter: the same loop and kernels;
  * warm-up: `warmup_runs` untimed full generations of the first question's first turn per
    configuration; then, before any timed call whose prompt shape is new for that configuration,
    `specdec.generate.warmup` on the exact prompts compiles it. Compile time is reported per
    configuration and never enters a timed call: the jit caches are checked around every timed
    call and a compile there is counted in `timed_compiles` (expected 0);
  * wall time per turn covers prefill + decode loop (`generate` returns host arrays, so the device
    work is finished); tokenization and detokenization are excluded;
  * order: run → question batch → configuration → turns. Interleaving the configurations per
    question spreads drifts in machine load evenly over the methods and the baseline;
  * the load average is sampled at start, after every question batch and at the end;
  * resumable: with a `journal` (the CLI's `<out>/progress.jsonl`) every finished question batch is
    appended (answers, turn records, acceptance histograms, its wall time and load); a rerun of the
    same configuration skips the batches already there and says so, and a different configuration
    is refused (`restart=True` discards the journal instead).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence

from specdec.eval.journal import Journal
from specdec.eval.methods import Method, target_id
from specdec.eval.metrics import TurnRecord, throughput
from specdec.eval.questions import Question, load_questions, select

BASELINE = "baseline"


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Everything that defines a run (saved verbatim in metrics.json)."""

    bench: str = "mt_bench"
    target: str = "smollm2-135m-instruct"
    methods: tuple[Method, ...] = (Method("ngram", "chain:4", "auto"),)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    limit: int | None = None
    categories: tuple[str, ...] = ()
    per_category: int | None = 2
    runs: int = 1
    batch_size: int = 1
    seed: int = 0
    raw: bool = False  # plain-text prompts (turns joined by blank lines) instead of the chat template
    system: str | None = None  # system message (chat mode); None = the template's default
    warmup_runs: int = 1
    dtype: str = "float32"
    mesh: str | None = None  # device mesh, e.g. "data=2,model=4" (specdec.sharding); None = one device
    check: bool = False  # tree and loop invariants every step (specdec.invariants): slower, for debugging
    num_samples: int = 1  # continuations per question turn (the conversation goes on with the first)
    shared_prefix: str = "auto"  # prompt prefixes shared by a batch's rows: prefilled and read once

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["methods"] = [m.label for m in self.methods]
        d["categories"] = list(self.categories)
        return d


@dataclasses.dataclass
class EvalResult:
    """What a run measured. `records[label]` / `answers[label][run][question_id]` hold every
    configuration, the baseline under `BASELINE`; `hists[label]` sums `accepted_hist` over timed calls."""

    config: EvalConfig
    labels: list[str]  # baseline first, then the methods in order
    methods: dict[str, Method]
    model_ids: dict[str, str]
    questions: list[Question]
    records: dict[str, list[TurnRecord]]
    answers: dict[str, dict[int, dict[int | str, list[str]]]]
    hists: dict[str, list[int]]
    compile_seconds: dict[str, float]
    warmup_seconds: dict[str, float]
    timed_compiles: dict[str, int]
    load: dict
    wall_seconds: float = 0.0
    target_source: str = ""
    tstamp: float = 0.0
    resumed_batches: int = 0  # question batches restored from the journal (not rerun)
    cache_clears: int = 0  # compiled programs dropped near vm.max_map_count (`memory_maps`)


def _jit_cache_size() -> int | None:
    """Compiled programs in the decode jits (None when this JAX has no `_cache_size`)."""
    from specdec.decode import loop_jit, prefill_jit

    try:
        return prefill_jit._cache_size() + loop_jit._cache_size()
    except AttributeError:
        return None


def memory_maps() -> tuple[int, int] | None:
    """(this process's memory mappings, the kernel's `vm.max_map_count`), or None off Linux.

    Every compiled XLA:CPU program holds mappings; a run that compiles many methods × prompt
    lengths can reach the limit (65,530 by default), and the next compile then segfaults."""
    try:
        with open("/proc/self/maps", "rb") as f:
            used = sum(1 for _ in f)
        with open("/proc/sys/vm/max_map_count") as f:
            return used, int(f.read())
    except (OSError, ValueError):
        return None


MAPS_HEADROOM = 0.6  # clear compiled programs above this fraction of vm.max_map_count


def _load_sample(t0: float) -> list[float]:
    return [round(time.perf_counter() - t0, 2), *(round(x, 2) for x in os.getloadavg())]


class _Prompter:
    """Conversation -> token ids: the chat template, or plain text joined by blank lines (`raw`)."""

    def __init__(self, tokenizer, raw: bool, system: str | None):
        if not raw and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the target's tokenizer has no chat template; run with --raw (plain-text turns)")
        self.tok, self.raw, self.system = tokenizer, raw, system

    def __call__(self, messages: Sequence[dict]) -> list[int]:
        from specdec.chat import chat_ids, raw_ids

        if self.raw:
            return raw_ids(self.tok, "\n\n".join(m["content"] for m in messages))
        return chat_ids(self.tok, messages, system=self.system)


def run_eval(
    config: EvalConfig, *, model=None, progress: bool = True, journal: os.PathLike | None = None,
    restart: bool = False,
) -> EvalResult:  # fmt: skip
    """Run every method and the baseline on the selected questions; see the module docstring.

    `model` (a `LoadedModel`) skips loading `config.target`. `journal` makes the run resumable.
    Raises QuestionFileError for a bad question file or selection, ValueError for a bad method, a
    prompt that does not fit or a journal of another configuration.
    """
    import jax
    from tqdm.auto import tqdm

    from specdec.drafters.rag import RagDraft
    from specdec.generate import PromptTooLongError, generate, prompt_block, warmup
    from specdec.loading import load_model
    from specdec.prefix_sharing import expand_samples, sharing_shape
    from specdec.sampling import SamplingConfig
    from specdec.sharding import device_params, parse_mesh, replicate

    if config.runs < 1 or config.batch_size < 1 or config.warmup_runs < 0 or config.num_samples < 1:
        raise ValueError("runs, batch_size and num_samples must be >= 1, warmup_runs >= 0")
    questions = select(
        load_questions(config.bench), categories=config.categories, per_category=config.per_category,
        limit=config.limit, source=config.bench,
    )  # fmt: skip
    t_start, tstamp = time.perf_counter(), time.time()
    load = {"cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "samples": []}
    load["start"] = _load_sample(t_start)[1:]
    mesh = parse_mesh(config.mesh)
    model = model or load_model(config.target, dtype=config.dtype, mesh=mesh)
    params, cfg = device_params(model.params, model.cfg, mesh)
    prompter = _Prompter(model.tokenizer, config.raw, config.system)
    sampling = SamplingConfig(config.temperature, config.top_k, config.top_p)

    methods = {BASELINE: Method(None, name=BASELINE)}
    for m in config.methods:
        if m.label in methods:
            raise ValueError(f"method {m.label!r} is given twice (or clashes with the baseline's name)")
        methods[m.label] = m
    labels = list(methods)
    engine = {lab: m.build(params, cfg) for lab, m in methods.items()}
    if mesh is not None:  # once here, not in every generate call
        for e in engine.values():
            if "draft_params" in e:
                e["draft_params"] = replicate(e["draft_params"], mesh)
    jr = None if journal is None else Journal(journal, config, [q.question_id for q in questions],
                                               restart=restart)  # fmt: skip
    tid = target_id(config.target)
    res = EvalResult(
        config=config, labels=labels, methods=methods,
        model_ids={lab: m.model_id(tid) for lab, m in methods.items()}, questions=questions,
        records={lab: [] for lab in labels}, answers={lab: {} for lab in labels},
        hists={lab: [] for lab in labels}, compile_seconds=dict.fromkeys(labels, 0.0),
        warmup_seconds=dict.fromkeys(labels, 0.0), timed_compiles=dict.fromkeys(labels, 0), load=load,
        target_source=str(model.source), tstamp=tstamp,
    )  # fmt: skip
    gen_kw = dict(max_new_tokens=config.max_new_tokens, sampling=sampling, mesh=mesh, check=config.check,
                  num_samples=config.num_samples, shared_prefix=config.shared_prefix)  # fmt: skip
    compiled: set[tuple] = set()

    def engine_for(lab: str, convs: list[list[dict]]) -> dict:
        """The method's engine arguments (a RAG drafter's with each conversation's short prompt)."""
        d, kw = engine[lab].get("drafter"), engine[lab]
        if not isinstance(d, RagDraft):
            return kw
        return {**kw, "draft_params": d.params_for(kw["draft_params"], convs, prompter, model.tokenizer)}

    def ensure_compiled(lab: str, prompts: list[list[int]], kw: dict) -> None:
        rag = kw.get("draft_params")
        rag = rag["prompt"].shape[1] if isinstance(rag, dict) and "prompt" in rag else 0
        rows = expand_samples(prompts, config.num_samples)
        shared = sharing_shape(rows, config.shared_prefix, prompt_block)
        key = (lab, len(prompts), prompt_block(max(len(p) for p in prompts)), rag, shared)
        if key in compiled:
            return
        maps = memory_maps()
        if maps is not None and maps[0] > MAPS_HEADROOM * maps[1]:
            # Compiled programs are dropped (and rebuilt, untimed, when next needed) rather than
            # letting the next compile crash the process at the kernel's map limit.
            if not res.cache_clears:
                logging.getLogger("specdec").warning(
                    "specdec-eval: compiled programs hold %d of vm.max_map_count=%d memory maps; clearing "
                    "them when they near it (they recompile untimed). To keep them: sudo sysctl -w "
                    "vm.max_map_count=262144", *maps
                )  # fmt: skip
            res.cache_clears += 1
            jax.clear_caches()
            compiled.clear()
        before, t0 = _jit_cache_size(), time.perf_counter()
        warmup(params, cfg, prompts, **gen_kw, **kw)
        dt, after = time.perf_counter() - t0, _jit_cache_size()
        grew = before is None or after is None or after > before
        res.compile_seconds[lab] += dt if grew else 0.0
        res.warmup_seconds[lab] += 0.0 if grew else dt
        compiled.add(key)

    def timed(lab: str, prompts: list[list[int]], seed: int, kw: dict):
        ensure_compiled(lab, prompts, kw)
        before, t0 = _jit_cache_size(), time.perf_counter()
        out = generate(params, cfg, prompts, seed=seed, **gen_kw, **kw)
        dt = time.perf_counter() - t0
        after = _jit_cache_size()
        if before is not None and after is not None and after > before:
            res.timed_compiles[lab] += 1
        return out, dt

    # Spec-Bench-style warm-up: full untimed generations of the first question's first turn.
    first_conv = [{"role": "user", "content": questions[0].turns[0]}]
    first = [prompter(first_conv)]
    for lab in labels:
        for _ in range(config.warmup_runs):
            kw = engine_for(lab, [first_conv])
            ensure_compiled(lab, first, kw)
            t0 = time.perf_counter()
            generate(params, cfg, first, seed=config.seed, **gen_kw, **kw)
            res.warmup_seconds[lab] += time.perf_counter() - t0

    batches = [questions[i : i + config.batch_size] for i in range(0, len(questions), config.batch_size)]
    n_turns = sum(len(q.turns) for q in questions)
    done = {} if jr is None else jr.done
    if done:
        print(f"resuming {jr.path}: {len(done)} of {config.runs * len(batches)} question batches already "
              "done with this configuration; skipping them")  # fmt: skip
    bar = tqdm(total=config.runs * n_turns * len(labels), unit="turn", disable=not progress,
               desc=f"{config.bench} × {len(labels)} configs")  # fmt: skip
    call = max((r["call"] for rec in done.values() for lab in rec["labels"]
                for r in rec["labels"][lab]["records"]), default=0)  # fmt: skip
    prior_seconds = 0.0
    for run in range(config.runs):
        for batch in batches:
            key = (run, tuple(q.question_id for q in batch))
            if key in done:
                prior_seconds += _restore(res, done[key], run)
                bar.update(sum(len(q.turns) for q in batch) * len(labels))
                continue
            t_batch = time.perf_counter()
            rec = {"run": run, "question_ids": list(key[1]), "labels": {}}
            for lab in labels:
                convs: list[list[dict]] = [[] for _ in batch]
                answers = res.answers[lab].setdefault(run, {})
                hist: list[int] = []
                new_records: list[TurnRecord] = []
                for turn in range(max(len(q.turns) for q in batch)):
                    rows = [i for i, q in enumerate(batch) if turn < len(q.turns)]
                    for i in rows:
                        convs[i].append({"role": "user", "content": batch[i].turns[turn]})
                    prompts = [prompter(convs[i]) for i in rows]
                    try:
                        kw = engine_for(lab, [convs[i] for i in rows])  # outside the timed call
                        out, dt = timed(lab, prompts, config.seed + run, kw)
                    except PromptTooLongError as e:
                        ids = [batch[i].question_id for i in rows]
                        raise ValueError(f"question(s) {ids}, turn {turn + 1}: {e}") from None
                    call += 1
                    _add_hist(hist, out.accepted_hist)
                    n = config.num_samples
                    for j, i in enumerate(rows):
                        # the first sample answers (and carries the conversation); all count as output
                        q, toks, samples = batch[i], out.tokens[j * n], out.tokens[j * n : (j + 1) * n]
                        text = model.tokenizer.decode(toks, skip_special_tokens=True).strip()
                        convs[i].append({"role": "assistant", "content": text})
                        answers.setdefault(q.question_id, []).append(text)
                        new_records.append(TurnRecord(
                            run=run, question_id=q.question_id, category=q.category, turn=turn,
                            new_tokens=sum(map(len, samples)), wall_time=dt,
                            steps=sum(out.row_steps[j * n : (j + 1) * n]),
                            step_tokens=sum(max(len(s) - 1, 0) for s in samples), tokens=tuple(toks),
                            batch_size=len(rows), call=call,
                            draft_calls=out.draft_calls if j == 0 else 0,
                            verify_width=out.verify_width if j == 0 else 0,
                            loop_steps=out.steps if j == 0 else 0, prefill_time=out.prefill_seconds,
                        ))  # fmt: skip
                    bar.update(len(rows))
                res.records[lab] += new_records
                _add_hist(res.hists[lab], hist)
                bar.set_postfix_str(_postfix(res), refresh=False)
                rec["labels"][lab] = {
                    "answers": [[q.question_id, answers[q.question_id]] for q in batch],
                    "records": [dataclasses.asdict(r) for r in new_records], "hist": hist,
                }  # fmt: skip
            sample = _load_sample(t_start)
            load["samples"].append(sample)
            if jr is not None:
                jr.append({**rec, "seconds": time.perf_counter() - t_batch, "load": sample})
    bar.close()
    load["end"] = _load_sample(t_start)[1:]
    res.wall_seconds = time.perf_counter() - t_start + prior_seconds
    res.resumed_batches = sum(1 for run in range(config.runs) for b in batches
                              if (run, tuple(q.question_id for q in b)) in done)  # fmt: skip
    return res


def _restore(res: EvalResult, rec: dict, run: int) -> float:
    """Put a journal batch back into `res`; return its wall seconds."""
    for lab, d in rec["labels"].items():
        answers = res.answers[lab].setdefault(run, {})
        for qid, texts in d["answers"]:
            answers[qid] = list(texts)
        res.records[lab] += [TurnRecord(**{**r, "tokens": tuple(r["tokens"])}) for r in d["records"]]
        _add_hist(res.hists[lab], d["hist"])
    res.load["samples"].append(rec["load"])
    return float(rec["seconds"])


def _add_hist(acc: list[int], hist: Sequence[int]) -> None:
    acc.extend([0] * (len(hist) - len(acc)))
    for k, c in enumerate(hist):
        acc[k] += int(c)


def _postfix(res: EvalResult) -> str:
    """Running pooled tok/s per configuration (and τ for methods), for the progress bar."""
    parts = []
    for n, lab in enumerate(res.labels):
        recs = res.records[lab]
        if not recs:
            continue
        rate = throughput(recs)
        steps = sum(r.steps for r in recs)
        tau = sum(r.step_tokens for r in recs) / steps if steps else float("nan")
        parts.append(f"base {rate:.1f}/s" if n == 0 else f"m{n} {rate:.1f}/s τ{tau:.2f}")
    return " | ".join(parts)
