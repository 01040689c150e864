"""specdec-generate: generate text from a target model (registry name, HF folder or .gguf file).

specdec-generate --prompt "Write a haiku about the sea." --max_new_tokens 64
specdec-generate --target /path/to/hf_folder --raw --prompt "Once upon a time" --temperature 0.8
specdec-generate --drafter ngram --tree chain:4 --loop python --check --trace steps.jsonl
specdec-generate --loop pearl --drafter layerskip:6 --gamma auto --mesh draft=1,target=1
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "Registry name, HF checkpoint folder or .gguf file.")
flags.DEFINE_string("prompt", "What is speculative decoding? Answer in two sentences.", "The prompt.")
flags.DEFINE_string(
    "prompt_file", None, "Read the prompt from this text file (a long document and a question)."
)
flags.DEFINE_bool("raw", False, "Feed the prompt as plain text instead of through the chat template.")
flags.DEFINE_string("system", None, "Optional system message (chat mode).")
flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.", lower_bound=1)
flags.DEFINE_float("temperature", 0.0, "0 = greedy.", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "Weights/activations (float32 is fastest on CPU)."
)
flags.DEFINE_enum(
    "loop",
    "device",
    ["device", "python", "pearl"],
    "On-device while_loop, the host debug loop, or PEARL (draft and target in parallel; docs/pearl.md).",
)
flags.DEFINE_bool("check", False, "Check tree and loop invariants every step; fail with the step and row.")
flags.DEFINE_string("trace", None, "Write one JSON line per step and row (tree, verdict, cache) here.")
flags.DEFINE_string(
    "drafter",
    None,
    "None = autoregressive; ngram[:n=N], layerskip:K, a shipped drafter (medusa, eagle[:conf=P], eagle3, "
    "amphista, falcon, dflash[:block=N]), a drafter checkpoint folder, an official checkpoint or a draft "
    "model; MODEL+ngram / MODEL+rest:DS fuses retrieval candidates into MODEL's tree; rest:DS drafts from "
    "a datastore; rag:MODEL[,budget=N] drafts from a retrieved, shortened prompt (RAPID).",
)
flags.DEFINE_string(
    "tree", "chain:4", "Tree builder: chain:K, static:medusa63, dynamic:depth=5,topk=8,n=32, ..."
)
flags.DEFINE_string(
    "verifier",
    "auto",
    "auto (lossless, fits the tree), greedy, rrs, block (chains), specinfer, target_only, ...; "
    "rapid:eta=E (RAPID's retrieval-augmented target, lossy for E > 0).",
)
flags.DEFINE_string(
    "mesh",
    None,
    "Device mesh, e.g. data=2,model=4 (default: one device; docs/sharding.md), or with --loop pearl "
    "draft=1,target=1: the draft model and the target on two devices, running concurrently (on CPU two "
    "host devices are created when XLA_FLAGS does not set a count).",
)
flags.DEFINE_string(
    "gamma",
    None,
    "--loop pearl: draft tokens per round, N >= 1, or 0 / auto (the default) = round(target step time / "
    "draft step time), measured before decoding.",
)
flags.DEFINE_integer("num_samples", 1, "Continuations of the prompt to generate (one batch).", lower_bound=1)
flags.DEFINE_enum(
    "shared_prefix", "auto", ["auto", "off"],
    "auto: rows sharing a prompt prefix (the samples of --num_samples) prefill and store it once and "
    "attention reads it once for all of them; off: every row keeps its own copy.",
)  # fmt: skip
flags.DEFINE_bool("json", False, "Print one JSON object instead of the text.")


def main(argv):
    del argv
    from specdec.cli.entry import check_flags

    check_flags(FLAGS, sampling=("temperature", "top_k", "top_p"))  # before anything loads
    gamma = _check_pearl_flags()
    if gamma is not None:
        return _pearl_main(gamma)
    # Imported here: --help and flag errors answer before any model code runs.
    import jax

    from specdec.chat import chat_ids, raw_ids
    from specdec.generate import generate, warmup
    from specdec.loading import load_model
    from specdec.sampling import SamplingConfig
    from specdec.sharding import device_params, parse_mesh

    mesh = parse_mesh(FLAGS.mesh)
    model = load_model(FLAGS.target, dtype=FLAGS.dtype, mesh=mesh)
    params, cfg = device_params(model.params, model.cfg, mesh)
    tok = model.tokenizer
    text = _prompt_text()
    ids = raw_ids(tok, text) if FLAGS.raw else chat_ids(tok, text, system=FLAGS.system)
    sampling = SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling, loop=FLAGS.loop, mesh=mesh,
              num_samples=FLAGS.num_samples, shared_prefix=FLAGS.shared_prefix)  # fmt: skip
    if FLAGS.drafter:
        from specdec.drafters import parse_drafter
        from specdec.drafters.rag import RagDraft
        from specdec.trees import fit, parse_tree
        from specdec.verifiers import get_verifier

        builder = parse_tree(FLAGS.tree)
        drafter, dparams = parse_drafter(FLAGS.drafter, params, cfg, max_depth=builder.max_depth)
        builder = fit(builder, drafter)  # a fused drafter (eagle+ngram) fuses its retrieval paths
        if isinstance(drafter, RagDraft):  # RAPID: the drafter reads the retrieved, shortened prompt

            def encode(messages):
                short = messages[0]["content"]
                return raw_ids(tok, short) if FLAGS.raw else chat_ids(tok, short, system=FLAGS.system)

            dparams = drafter.params_for(dparams, [[{"role": "user", "content": text}]], encode, tok)
        kw.update(
            drafter=drafter, draft_params=dparams, builder=builder, verifier=get_verifier(FLAGS.verifier)
        )
    t0 = time.perf_counter()
    if not (FLAGS.check or FLAGS.trace):  # a debugging run compiles its own programs: no warm-up
        warmup(params, cfg, [ids], **kw)
    compile_s = time.perf_counter() - t0  # compile + one step: time the real run cleanly
    t0 = time.perf_counter()
    out = generate(params, cfg, [ids], seed=FLAGS.seed, check=FLAGS.check, trace=FLAGS.trace, **kw)
    seconds = time.perf_counter() - t0
    texts = [tok.decode(new, skip_special_tokens=True) for new in out.tokens]
    total = sum(len(new) for new in out.tokens)
    if FLAGS.json:
        record = {
            "text": texts[0], "tokens": out.tokens[0], "new_tokens": total, "prompt_tokens": len(ids),
            "seconds": round(seconds, 4), "prefill_seconds": round(out.prefill_seconds, 4),
            "tokens_per_s": round(total / seconds, 2),
            "compile_seconds": round(compile_s, 2), "target": model.source,
            "drafter": FLAGS.drafter, "tree": FLAGS.tree if FLAGS.drafter else None,
            "tau": round(out.tau, 3), "steps": out.steps, "accepted_hist": out.accepted_hist,
            "device": str(jax.devices()[0].platform), "mesh": FLAGS.mesh,
        }  # fmt: skip
        if FLAGS.num_samples > 1:
            record["samples"] = [{"text": t, "tokens": new} for t, new in zip(texts, out.tokens, strict=True)]
            record["shared_tokens"] = out.shared_tokens
        print(json.dumps(record))
    else:
        for i, text in enumerate(texts):
            print(text if len(texts) == 1 else f"--- sample {i + 1} ---\n{text}")
        rate = total / seconds
        shared = f"; {out.shared_tokens} prompt tokens shared" if out.shared_tokens else ""
        print(f"\n[{total} tokens in {seconds:.2f} s = {rate:.1f} tok/s (prefill "
              f"{out.prefill_seconds:.2f} s); tau {out.tau:.2f} over {out.steps} steps; "
              f"compile {compile_s:.1f} s{shared}; {model.source}]")  # fmt: skip


def _prompt_text() -> str:
    """--prompt, or the contents of --prompt_file."""
    return pathlib.Path(FLAGS.prompt_file).read_text() if FLAGS.prompt_file else FLAGS.prompt


def _check_pearl_flags() -> int | None:
    """Refuse flag combinations PEARL cannot take (ValueError, before anything loads). Returns
    --gamma for --loop pearl (0 = measure it), None for the other loops."""
    from specdec.pearl_mesh import is_role_spec

    roles = is_role_spec(FLAGS.mesh)
    if FLAGS.loop != "pearl":
        if FLAGS["gamma"].present:
            raise ValueError("--gamma is PEARL's draft length per round; use it with --loop pearl")
        if roles:
            raise ValueError(f"--mesh {FLAGS.mesh} places PEARL's draft and target; use it with --loop pearl")
        return None
    if not FLAGS.drafter:
        raise ValueError("--loop pearl needs a token-level --drafter: layerskip:K or a draft model")
    for name in ("tree", "verifier"):
        if FLAGS[name].present:
            raise ValueError(
                f"--loop pearl drafts a chain of --gamma tokens and verifies it itself; drop --{name}"
            )
    for name in ("check", "trace"):
        if FLAGS[name].present:
            raise ValueError(f"--{name} follows the standard loop's trees; drop it with --loop pearl")
    if FLAGS.num_samples > 1:
        raise ValueError("--loop pearl decodes one continuation of the prompt; drop --num_samples")
    if FLAGS.mesh and not roles:
        raise ValueError(
            f"--mesh {FLAGS.mesh}: --loop pearl runs each model whole on one device; use --mesh "
            "draft=1,target=1 (two devices) or no --mesh"
        )
    g = (FLAGS.gamma or "auto").strip()
    if g == "auto":
        return 0
    if not g.isdigit():
        raise ValueError(f"--gamma must be a whole number >= 1, or 0 / auto (measured), got {FLAGS.gamma!r}")
    return int(g)


def _pearl_main(gamma: int) -> None:
    """specdec-generate --loop pearl: PEARL with a token-level draft model, on one device or two."""
    import os

    from specdec.pearl_mesh import is_role_spec

    if is_role_spec(FLAGS.mesh) and "xla_force_host_platform_device_count" not in os.environ.get(
        "XLA_FLAGS", ""
    ):
        # before the first JAX backend starts: two CPU devices (other platforms are unaffected)
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
        )
    import jax

    from specdec.chat import chat_ids, raw_ids
    from specdec.drafters import DraftModel, parse_drafter
    from specdec.generate import generate, warmup
    from specdec.loading import load_model
    from specdec.models import to_device
    from specdec.pearl_gamma import profile_gamma
    from specdec.pearl_mesh import parse_roles
    from specdec.sampling import SamplingConfig

    roles = parse_roles(FLAGS.mesh) if FLAGS.mesh else None
    model = load_model(FLAGS.target, dtype=FLAGS.dtype)
    cfg, tok = model.cfg, model.tokenizer
    params = to_device(model.params, cfg)
    drafter, dparams = parse_drafter(FLAGS.drafter, params, cfg, max_depth=1)
    if not isinstance(drafter, DraftModel):
        raise ValueError(
            f"--drafter {FLAGS.drafter}: --loop pearl needs a token-level draft model (layerskip:K or a "
            f"draft model), got {type(drafter).__name__}"
        )
    if roles is not None:  # placed once: every round then runs where its params live
        params, dparams = jax.device_put(params, roles[1]), jax.device_put(dparams, roles[0])
    text = _prompt_text()
    ids = raw_ids(tok, text) if FLAGS.raw else chat_ids(tok, text, system=FLAGS.system)
    profile = None
    if gamma == 0:
        profile = profile_gamma(params, cfg, drafter, dparams, context=len(ids), devices=roles)
        gamma = profile.gamma
    sampling = SamplingConfig(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, sampling=sampling, loop="pearl", drafter=drafter,
              draft_params=dparams, gamma=gamma, roles=roles)  # fmt: skip
    t0 = time.perf_counter()
    warmup(params, cfg, [ids], **kw)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(params, cfg, [ids], seed=FLAGS.seed, **kw)
    seconds = time.perf_counter() - t0
    new = out.tokens[0]
    text = tok.decode(new, skip_special_tokens=True)
    measured = (f"measured: target step {profile.target_step_s * 1e3:.1f} ms, draft step "
                f"{profile.draft_step_s * 1e3:.1f} ms" if profile else "set by --gamma")  # fmt: skip
    if FLAGS.json:
        print(json.dumps({
            "text": text, "tokens": new, "new_tokens": len(new), "prompt_tokens": len(ids),
            "seconds": round(seconds, 4), "tokens_per_s": round(len(new) / seconds, 2),
            "compile_seconds": round(compile_s, 2), "target": model.source, "drafter": FLAGS.drafter,
            "loop": "pearl", "gamma": gamma, "gamma_source": measured, "tau": round(out.tau, 3),
            "steps": out.steps, "accepted_hist": out.accepted_hist,
            "post_rounds": sum(out.round_modes[0]), "device": str(jax.devices()[0].platform),
            "mesh": FLAGS.mesh, "devices": [str(d) for d in roles] if roles else None,
        }))  # fmt: skip
    else:
        print(text)
        where = f"draft on {roles[0]}, target on {roles[1]}" if roles else "one device"
        rate = len(new) / seconds
        print(f"\n[{len(new)} tokens in {seconds:.2f} s = {rate:.1f} tok/s; PEARL gamma {gamma} "
              f"({measured}); tau {out.tau:.2f} over {out.steps} rounds, {sum(out.round_modes[0])} in POST; "
              f"{where}; compile {compile_s:.1f} s; {model.source}]")  # fmt: skip


def _parse_and_generate(argv: list[str]) -> None:
    from specdec.cli.entry import parse_flags

    main(parse_flags(FLAGS, argv))


def run():
    """Console-script entry point (`specdec-generate`)."""
    from specdec.cli.entry import run_console

    run_console("specdec-generate", __doc__, FLAGS, _parse_and_generate)


if __name__ == "__main__":
    run()
