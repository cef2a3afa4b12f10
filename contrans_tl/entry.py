"""How every command-line entry point (``contrans …``, ``python -m contrans_tl.analyses.…``) runs.

A user error (any :class:`ContransError`, a bad flag, or an OS error about a path the user named)
prints one line ``contrans: error: …`` and exits 2; an unexpected exception prints one line and the path of a file holding the full
traceback, and exits 1. ``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

from contrans_tl.errors import ContransError
from contrans_tl.files import atomic_write_text

__all__ = ["CommandParser", "split_debug", "run_reporting_errors"]


class CommandParser(argparse.ArgumentParser):
    """argparse with one-line errors (``contrans: error: …``, exit 2) instead of a usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"contrans: error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        self.exit(2)


def split_debug(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    rest = [a for a in argv if a != "--debug"]
    return rest, len(rest) != len(argv)


_PATH_ERRORS = (FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
"""OS errors that come from a path on the command line (an output folder that is a file, say): a user
error in one line, exit 2. Flags declare path types (contrans_tl.validate) so these are caught before any
work; this is the net for a command whose flags do not yet."""


def run_reporting_errors(fn: Callable[[], Any], *, debug: bool) -> int:
    """Run ``fn()``; turn its outcome into an exit code, reporting errors as one line each."""
    try:
        return int(fn() or 0)
    except ContransError as err:
        if debug:
            raise
        print(f"contrans: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except _PATH_ERRORS as err:  # a path the user named: an existing file for a folder, a folder not writable
        if debug:
            raise
        print(f"contrans: error: {type(err).__name__}: {err} (choose another path)", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 - the one place that turns a crash into a report
        if debug:
            raise
        path = Path(tempfile.gettempdir()) / f"contrans-traceback-{time.strftime('%Y%m%d-%H%M%S')}.txt"
        atomic_write_text(path, traceback.format_exc())
        print(f"contrans: internal error: {type(err).__name__}: {err} (full traceback: {path}; "
              "rerun with --debug to see it here)", file=sys.stderr)
        return 1
