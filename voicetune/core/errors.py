"""Errors meant for the person running the pipeline, and how stage scripts report them.

Any exception deriving from ``UserError`` carries a message that already says what is
wrong, where, and how to fix it: stage scripts print it (no traceback) and exit 1. Anything
else is a bug and keeps its traceback.
"""
from __future__ import annotations

import signal
import sys
from typing import Callable


class UserError(Exception):
    """Bad input or configuration; ``str(err)`` is the whole message for the user."""


def _terminated(signum, frame) -> None:
    # SIGTERM (dvc, a CI timeout, `kill`) would end the process without running any `finally`:
    # as an exception, every atomic writer removes its temporary files on the way out
    raise SystemExit(128 + signum)


def run_stage(name: str, main: Callable[[], int | None]) -> None:
    """Run a stage's ``main`` and exit with its code; a ``UserError`` becomes
    ``<name>: <message>`` on stderr and exit code 1, without a traceback. SIGTERM ends it
    with exit code 143 after its cleanup (temporary outputs removed, the last good kept)."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        code = main()
    except UserError as err:
        print(f"{name}: {err}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code or 0)
