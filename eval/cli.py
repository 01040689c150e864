"""specdec-eval: speedup and τ on MT-Bench (or any Spec-Bench question file), the Spec-Bench way.

    specdec-eval                                   # main job: ngram chain:4, eagle 4-node tree
    specdec-eval --all                             # all 80 MT-Bench questions
    specdec-eval --drafter layerskip:6 --tree dynamic:depth=3,topk=2,n=8
    specdec-eval --compare "ngram|chain:4|auto" --compare "layerskip:6|chain:2|auto"
    specdec-eval --bench question.jsonl --categories math,coding --runs 3

The flags live in their own absl `FlagValues` (`FLAGS` below, not `absl.flags.FLAGS`), so this
module can be imported next to `specdec.cli.generate`, which defines flags of the same names.
`evaluate(argv)` is the programmatic entry point. See docs/eval.md.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

from absl import flags

FLAGS = flags.FlagValues()
_string = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_int = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
_float = functools.partial(flags.DEFINE_float, flag_values=FLAGS)
_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)

_string("bench", "mt_bench", "mt_bench (the bundled MT-Bench questions) or a question.jsonl path.")
_string("target", "smollm2-135m-instruct", "Registry name, HF checkpoint folder or .gguf file.")
_string("drafter", "ngram", "ngram[:n=N], layerskip:K or a draft-model path ('none' = AR).")
_string("tree", "chain:4", "Tree builder: chain:K, static:medusa63, dynamic:depth=5,topk=8,n=32, ...")
_string("verifier", "auto", "auto (lossless, fits the tree), greedy, rrs, target_only, typical, ...")
flags.DEFINE_multi_string(
    "compare", None,
    "Repeatable 'drafter|tree|verifier' (tree, verifier optional): evaluate several methods against one "
    "shared baseline in one table. Replaces --drafter/--tree/--verifier.", flag_values=FLAGS,
)  # fmt: skip
_float("temperature", 0.0, "0 = greedy (and the lossless check runs).", lower_bound=0.0)
_int("top_k", 0, "Keep the k most likely tokens (0 = off).", lower_bound=0)
_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_int("max_new_tokens", 128, "Tokens per turn at most (Spec-Bench: 1024).", lower_bound=1)
_int("limit", None, "Keep the first N selected questions.", lower_bound=0)
flags.DEFINE_list("categories", [], "Only these categories (comma-separated).", flag_values=FLAGS)
_int("per_category", 2, "First N questions of each category (file order).", lower_bound=0)
_bool("all", False, "Every question of --bench (ignores --per_category).")
_int("runs", 1, "Timed repeats (mean ± std over runs; Spec-Bench: 3).", lower_bound=1)
_int("batch_size", 1, "Questions decoded together (Spec-Bench: 1).", lower_bound=1)
_int("num_samples", 1, "Continuations per question turn, decoded together (the first one answers).",
     lower_bound=1)  # fmt: skip
flags.DEFINE_enum(
    "shared_prefix", "auto", ["auto", "off"],
    "auto: a prompt prefix shared by a batch's rows (a long --system message, the samples of "
    "--num_samples) is prefilled and stored once and read once per step; off: every row keeps its own copy.",
    flag_values=FLAGS,
)  # fmt: skip
_string("mesh", None, "Device mesh, e.g. data=2,model=4 (default: one device; docs/sharding.md).")
_int("warmup_runs", 1, "Untimed full generations per configuration first.", lower_bound=0)
_string("out", "runs/mtbench", "Output folder (answers, metrics.json, report.md, plots).")
_int("seed", 0, "Random seed (run r uses seed + r).")
_bool("raw", False, "Plain-text prompts (turns joined by blank lines), no chat template.")
_string("system", None, "System message (chat mode; default: the template's own).")
flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Target dtype (float32: fastest on CPU).", flag_values=FLAGS
)
_bool("progress", True, "Show the progress bar.")
_bool("check", False, "Check the tree and loop invariants every step (slower; fails with the step and row).")
_bool(
    "restart", False,
    "Discard <out>/progress.jsonl and start over (by default a rerun resumes an interrupted run of the "
    "same configuration, skipping finished questions).",
)  # fmt: skip


class UsageError(ValueError):
    """Bad command line."""


# The main job: the best training-free drafter on this CPU and the best shipped trained drafter,
# against one shared baseline. Chosen by measurement (benchmarks/choose_trees.py: a(d) x this CPU's
# step cost), confirmed on MT-Bench all 80 (Zen 3, docs/cpu.md): the shipped EAGLE-1 on a 4-node tree
# of depth 2 1.31x (tau 1.70) vs 1.20x on chain:3; ngram chain:4 1.55x. Larger trees cost more than
# they add on a CPU.
DEFAULT_METHODS = ("ngram|chain:4|auto", "eagle|dynamic:depth=2,topk=3,n=4|auto")


def methods_from_flags():
    """The Method list: the --compare entries, or the single --drafter/--tree/--verifier method."""
    from specdec.eval.methods import Method

    if FLAGS.compare:
        given = [f for f in ("drafter", "tree", "verifier") if FLAGS[f].present]
        if given:
            raise UsageError(f"--compare replaces --drafter/--tree/--verifier; drop --{', --'.join(given)}")
        return tuple(Method.parse(s) for s in FLAGS.compare)
    if not any(FLAGS[f].present for f in ("drafter", "tree", "verifier")):
        return tuple(Method.parse(s) for s in DEFAULT_METHODS)
    drafter = FLAGS.drafter.strip()
    if drafter.lower() in ("none", "ar", "baseline", ""):
        return (Method(None),)
    return (Method(drafter, FLAGS.tree, FLAGS.verifier),)


def config_from_flags():
    from specdec.eval.mtbench import EvalConfig

    return EvalConfig(
        bench=FLAGS.bench, target=FLAGS.target, methods=methods_from_flags(),
        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
        max_new_tokens=FLAGS.max_new_tokens, limit=FLAGS.limit, categories=tuple(FLAGS.categories),
        per_category=None if FLAGS.all else FLAGS.per_category, runs=FLAGS.runs,
        batch_size=FLAGS.batch_size, seed=FLAGS.seed, raw=FLAGS.raw, system=FLAGS.system,
        warmup_runs=FLAGS.warmup_runs, dtype=FLAGS.dtype, mesh=FLAGS.mesh, check=FLAGS.check,
        num_samples=FLAGS.num_samples, shared_prefix=FLAGS.shared_prefix,
    )  # fmt: skip


def evaluate(argv: Sequence[str], *, model=None) -> dict:
    """Parse `argv` (argv[0] = program name), run the evaluation, write and print the report.

    Returns the metrics dict. Raises UsageError / QuestionFileError / ValueError on bad input.
    `model` (a LoadedModel) skips loading --target (tests).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if FLAGS.is_parsed():
        FLAGS.unparse_flags()
    try:
        rest = FLAGS(list(argv))
    except flags.Error as e:
        raise UsageError(str(e)) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments {rest[1:]} (all options are --flags)")
    from specdec.cli.entry import check_flags, check_out_folder

    try:  # before the model loads: nothing is lost
        check_flags(FLAGS, sampling=("temperature", "top_k", "top_p"))
        check_out_folder("out", FLAGS.out)
    except ValueError as e:
        raise UsageError(str(e)) from None
    from specdec.eval.mtbench import run_eval
    from specdec.eval.report import tables, write_all

    journal = os.path.join(FLAGS.out, "progress.jsonl")
    res = run_eval(config_from_flags(), model=model, progress=FLAGS.progress, journal=journal,
                   restart=FLAGS.restart)  # fmt: skip
    m = write_all(res, FLAGS.out)
    mach = m["machine"]
    print()
    print(tables(m))
    print(f"\n{m['n_questions']} questions, {m['n_turns']} turns, {res.wall_seconds:.0f} s wall "
          f"(load avg {mach['loadavg_start'][0]:.2f} -> {mach['loadavg_end'][0]:.2f} on {mach['cpu_count']} "
          f"CPUs). Report: {os.path.join(FLAGS.out, 'report.md')}")  # fmt: skip
    return m


def run() -> None:
    """Console-script entry point (`specdec-eval`)."""
    from specdec.cli.entry import run_console

    head = "\n\n".join(__doc__.split("\n\n")[:2]) + "\n"
    run_console("specdec-eval", head, FLAGS, evaluate)


if __name__ == "__main__":
    run()
