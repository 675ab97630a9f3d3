"""The command-line boundary every command of the project shares: exit 0, or 1 with one line on stderr,
or 2 for a usage error; tracebacks only with --debug.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from recovery.core.errors import UpdateError
from recovery.core.output import setup_logging


class UsageError(Exception):
    """A command line that makes no sense: exit 2."""


def boundary(run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command: exit 0, 1 with one line on stderr for an UpdateError, 2 for a usage error.

    Tracebacks are shown only with --debug; anything unexpected is still one line without it.
    """
    debug = getattr(args, "debug", False)
    setup_logging(debug)
    try:
        return run(args) or 0
    except UpdateError as e:
        if debug:
            raise
        print(f"{e.kind}: {e}", file=sys.stderr)
        return 1
    except UsageError as e:
        print(f"usage error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # the boundary: one line, not a traceback, unless asked
        if debug:
            raise
        print(f"error: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return 1


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show debug output and tracebacks")


def run_cli(
    p: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    prepare: Callable[[argparse.Namespace], None] | None = None,
) -> int:
    """Parse `argv` (usage errors exit 2, as argparse prints them), then run the chosen command."""
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if prepare is not None:
        prepare(args)
    return boundary(args.run, args)
