"""The shared console-script wrapper: help without importing JAX, errors as one line + exit 2, a
quiet start (only what the user asked for, real warnings and specdec's named fallbacks)."""

from __future__ import annotations

import math
import os
import pathlib
import sys
from collections.abc import Callable

from absl import app, flags

HELP_FLAGS = ("-h", "--help", "-?", "--helpfull", "--helpshort")


def quiet_start() -> None:
    """Silence the start-up chatter of the libraries under the CLIs, before they are imported.

    * transformers' "PyTorch was not found. Models won't be available ..." (an advisory warning:
      specdec uses transformers for tokenizers and configs only, never its torch models);
    * absl's `app.run` raises Python logging to INFO, which shows JAX's "Unable to initialize backend
      'tpu': ... libtpu.so ..." on every machine without a TPU, and libraries' INFO timings. Logging
      goes back to WARNING unless the user set --verbosity (specdec-generate has absl's flags).

    Warnings stay: real problems, specdec's named fallbacks (`logging.getLogger("specdec")`, e.g. no
    CPU kernels) and JAX's own fallback ("An NVIDIA GPU may be present ... Falling back to cpu"). No
    platform is forced (JAX_PLATFORMS is left to the user). An environment variable the user set wins.
    """
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


def check_flags(flag_values: flags.FlagValues, *, sampling: tuple[str | None, str | None, str | None] = ()):
    """Refuse bad numbers before anything loads, naming the flag and the valid range.

    `sampling`: the names of the tool's (temperature, top_k, top_p) flags (None for one it lacks),
    checked as `SamplingConfig` checks them. Then every float flag must be a finite number (absl's
    bounds let NaN through: `--temperature nan` generated token 0 with exit status 0). Raises
    ValueError (`run_console` prints it as one line, exit status 2).
    """
    if sampling:
        from specdec.sampling import check_sampling

        defaults = {"temperature": 0.0, "top_k": 0, "top_p": 1.0}
        values, names = {}, {}
        for option, name in zip(("temperature", "top_k", "top_p"), sampling, strict=True):
            values[option] = defaults[option] if name is None else flag_values[name].value
            names[option] = option if name is None else f"--{name}"
        check_sampling(**values, names=names)
    for name in flag_values:  # every flag once, by its name
        flag = flag_values[name]
        if flag.name != name or not isinstance(flag.parser, flags.FloatParser):
            continue
        v = flag.value
        if v is not None and not math.isfinite(v):
            lo, hi = flag.parser.lower_bound, flag.parser.upper_bound
            rng = f" in [{lo:g}, {hi:g}]" if lo is not None and hi is not None else (
                f" >= {lo:g}" if lo is not None else f" <= {hi:g}" if hi is not None else ""
            )  # fmt: skip
            raise ValueError(f"--{flag.name} must be a finite number{rng}, got {v}")


def check_out_folder(flag: str, path: str | os.PathLike | None) -> None:
    """Refuse an output folder that cannot be created, before any work: `path` itself or one of its
    parents is an existing file, or the nearest existing parent is not writable (ValueError)."""
    if not path:
        return
    p = pathlib.Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(
            f"--{flag} {path} is an existing file; --{flag} names a folder (results are written inside it)"
        )
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(
                    f"--{flag} {path}: {parent} is an existing file, so the folder cannot be created "
                    "there; pass a folder path"
                )
            if not p.exists() and not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(
                    f"--{flag} {path}: cannot create a folder in {parent} (permission denied); pass a "
                    "writable location"
                )
            return


def parse_flags(flag_values: flags.FlagValues, argv: list[str]) -> list[str]:
    """Parse `argv` from the defaults (also on a second call in one process, e.g. in tests); a flag
    error leaves the flags parsed (absl reads its own after main returns) and propagates; stray
    positional arguments are a usage error. Returns the remaining argv (program name only)."""
    if flag_values.is_parsed():
        flag_values.unparse_flags()
    try:
        rest = flag_values(argv)
    except flags.Error:
        flag_values.unparse_flags()
        flag_values(argv[:1])
        raise
    if len(rest) > 1:
        raise app.UsageError(f"unexpected arguments {rest[1:]} (all options are --flags)")
    return rest


def run_console(
    prog: str,
    helptext: str,
    flag_values: flags.FlagValues,
    body: Callable[[list[str]], object],
    errors: tuple[type[BaseException], ...] = (),
) -> None:
    """Run `body(argv)` under absl; bad input prints one line, `prog: error: ...`, and exits with 2.

    Bad input is a flag error, a `ValueError` (every specdec input error derives from it: bad
    checkpoints, data, question files, trees, prompts that do not fit), an `OSError` (missing or
    unreadable files) or one of `errors`. `SPECDEC_TRACEBACK=1` re-raises instead (debugging).
    """
    argv = list(sys.argv)
    caught = (flags.Error, app.UsageError, ValueError, OSError, *errors)

    def main(_):
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(helptext + "\n" + flag_values.get_help())
            return
        quiet_start()
        try:
            body(argv)
        except caught as e:
            if os.environ.get("SPECDEC_TRACEBACK"):
                raise
            msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message
            print(f"{prog}: error: {msg}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=argv[:1])
