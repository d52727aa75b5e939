"""Expected failures, and the one place every npgpt command line turns them into a message.

An expected failure (bad input, a missing file, a full disk) ends a command with one line
on stderr, `error: <what is wrong>; <what to do>`, and exit status 1. Anything else is a
bug in npgpt and keeps its Python traceback. `--debug` (or NPGPT_DEBUG=1) shows the
traceback of expected failures too.

    from npgpt.errors import UserError, add_debug_flag, run_cli

    raise UserError("--data notes.txt does not exist; give a UTF-8 text file")

    def main(argv=None) -> int:
        return run_cli(_main, argv)     # _main(argv) parses its arguments and returns 0

Every npgpt error type (CheckpointError, WeightsError, TrainingError, ConversionError,
TokenizerFileError, BackendError, ...) is a UserError. OSErrors (a missing or unreadable
file, a full disk) are expected failures too; a broken pipe (`... | head`) ends the
command quietly with status 141, as `cat` does; Ctrl-C ends it with status 130.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Sequence

DEBUG_ENV = "NPGPT_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 130, 141


class UserError(Exception):
    """An expected failure; the message says what is wrong and, after a ';', what to do."""


def add_debug_flag(parser) -> None:
    """Give an argparse parser the --debug flag (read by `run_cli` before parsing)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help=f"show Python tracebacks of errors (also: {DEBUG_ENV}=1)")


def debugging(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_message(error: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug."""
    if isinstance(error, UserError):
        message = str(error)
    elif isinstance(error, MemoryError):
        message = "out of memory; use a smaller model, --batch-size or --context"
    elif isinstance(error, OSError):
        message = _os_error_message(error)
    else:
        return None
    return " ".join(message.split())  # one line, whatever the message held


def _os_error_message(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename is not None else ""
    reason = error.strerror or str(error)
    todo = {
        errno.ENOSPC: "free some space or write somewhere else (e.g. another --out-dir)",
        errno.EDQUOT: "free some space or write somewhere else (e.g. another --out-dir)",
        errno.ENOENT: "check the path",
        errno.EACCES: "check the permissions, or choose another path",
        errno.EPERM: "check the permissions, or choose another path",
        errno.EROFS: "choose a writable folder",
        errno.EISDIR: "give a file, not a folder",
        errno.ENOTDIR: "a part of the path is a file; give a folder",
        errno.EEXIST: "remove it or choose another path",
    }.get(error.errno, "check the path and try again")
    return f"{where}{reason}; {todo}"


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call main(argv) and return its exit status, reporting expected failures as one line."""
    try:
        return main(argv) or 0
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except Exception as error:  # noqa: BLE001 -- sorted into expected failures and bugs below
        message = error_message(error)
        if message is None:
            raise
        if debugging(argv):
            traceback.print_exc()
        _flush_quietly(sys.stdout)
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _flush_quietly(stream) -> None:
    try:
        stream.flush()
    except (OSError, ValueError):
        pass


def _silence_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush
    does not fail again (Python's documented recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
