"""The shared console-script wrapper: help without importing JAX, errors as one line + exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app, flags

HELP_FLAGS = ("-h", "--help", "-?", "--helpfull", "--helpshort")


def run_console(
    prog: str,
    helptext: str,
    flag_values: flags.FlagValues,
    body: Callable[[list[str]], object],
    errors: tuple[type[BaseException], ...],
) -> None:
    """Run `body(argv)` under absl; `errors` print as `prog: error: ...` and exit with status 2."""
    argv = list(sys.argv)

    def main(_):
        if any(a in HELP_FLAGS for a in argv[1:]):
            print(helptext + "\n" + flag_values.get_help())
            return
        try:
            body(argv)
        except errors as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(main, argv=argv[:1])
