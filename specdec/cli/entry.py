"""The shared console-script wrapper: help without importing JAX, errors as one line + exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

HELP_FLAGS = ("-h", "--help", "-?", "--helpfull", "--helpshort")


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
    import os

    argv = list(sys.argv)
    caught = (flags.Error, app.UsageError, ValueError, OSError, *errors)

    def main(_):
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(helptext + "\n" + flag_values.get_help())
            return
        try:
            body(argv)
        except caught as e:
            if os.environ.get("SPECDEC_TRACEBACK"):
                raise
            msg = " ".join(str(e).split()) or type(e).__name__  # one line, whatever the message
            print(f"{prog}: error: {msg}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=argv[:1])
