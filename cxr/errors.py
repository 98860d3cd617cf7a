"""Errors a user can cause, and how stages report them: one clear line, no traceback."""
from __future__ import annotations

import functools
import logging
import sys


class UserError(Exception):
    """A problem the user can fix (bad params, missing data, no network). Printed as one line."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def cli(main):
    """Wrap a stage's main(): log setup, and a UserError becomes `error: ...` on stderr with exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapper
