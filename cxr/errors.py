"""Errors a user can cause, and how stages report them: one clear line, no traceback.

Exit status of every stage and command: 0 done; 2 a problem the user can fix (one `error:` line);
3 an internal error, i.e. a bug (with its traceback); 130 interrupted. `predict` adds 1: some input
files could not be predicted (each has its error row), so 1 never stands for a crash.
"""
from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
import warnings

EXIT_USER = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class UserError(Exception):
    """A problem the user can fix (bad params, missing data, no network). Printed as one line."""


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message} ({os.path.basename(filename)}:{lineno})"


def setup_logging() -> None:
    """Stage output: `HH:MM:SS <logger>: message` lines; a warning (ours or a library's) is one such line
    too, `py.warnings: UserWarning: ... (file.py:line)`, instead of Python's two with the source line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    warnings.formatwarning = _one_line
    logging.captureWarnings(True)


def describe_os_error(err: OSError) -> str:
    """`path: reason` for an OSError (permission denied, disk full, a file where a folder belongs)."""
    what = err.strerror or type(err).__name__
    if err.filename is not None and err.filename2 is not None:
        return f"{err.filename} -> {err.filename2}: {what}"
    if err.filename is not None:
        return f"{err.filename}: {what}"
    return str(err) or what


def cli(main):
    """Wrap a stage's main(): log setup; a UserError, or an OSError from the file system, becomes `error: ...`
    on stderr with exit code 2; any other exception is a bug: its traceback, and exit code 3."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        setup_logging()
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
        except OSError as err:
            print(f"error: {describe_os_error(err)}", file=sys.stderr)
            raise SystemExit(EXIT_USER) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except MemoryError:
            print("error: out of memory", file=sys.stderr)
            raise SystemExit(EXIT_INTERNAL) from None
        except Exception:
            traceback.print_exc()
            print("error: internal error (a bug, not a problem with the input): see the traceback above", file=sys.stderr)
            raise SystemExit(EXIT_INTERNAL) from None

    return wrapper
