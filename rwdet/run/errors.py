"""One line, exit code 2, for every user error of every rwdet tool.

A user error is anything the user can fix by changing what they asked for: a bad flag value,
a missing or corrupt file, weights of another model, a read-only or full output folder. The
message names the bad value and the fix; a traceback would only hide it. ``--debug`` (taken
out of ``argv`` here, so every tool accepts it) or ``RWDET_DEBUG=1`` re-raises instead.

Programming errors (``TypeError``, ``KeyError``, ``AssertionError``, ...) are not caught: they
are bugs and keep their traceback.
"""

from __future__ import annotations

import errno
import os
import pickle
import sys
from collections.abc import Callable

from rwdet.run.stop import EXIT_STOPPED, StopRequested

EXIT_USAGE = 2  # argparse's code for a bad command line; rwdet uses it for every user error
DEBUG_ENV = "RWDET_DEBUG"


class UserError(ValueError):
    """A mistake in the request (flags, config, files), not in rwdet; shown as one line."""


# OSErrors a user causes and can fix (a path, a permission, a full disk), not rwdet bugs.
_USER_ERRNOS = {
    errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.EROFS,
    errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.EEXIST, errno.ENOTEMPTY,
}  # fmt: skip


# Raised with a message alone (no errno) by rwdet for a missing file or folder the user named.
_USER_OSERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError,
                  PermissionError)  # fmt: skip


def is_user_error(e: BaseException) -> bool:
    if isinstance(e, (ValueError, FloatingPointError, pickle.UnpicklingError, EOFError)):
        return True
    if isinstance(e, _USER_OSERRORS):
        return True
    return isinstance(e, OSError) and e.errno in _USER_ERRNOS


def one_line(e: BaseException) -> str:
    """The exception as one line: its message, or for an OSError its file and reason."""
    if isinstance(e, OSError) and e.strerror and not isinstance(e, UserError):
        where = f"{e.filename!r}: " if e.filename else ""
        hint = {
            errno.ENOSPC: "; free disk space or choose another --output-dir",
            errno.EDQUOT: "; free disk space or choose another --output-dir",
            errno.EROFS: "; choose a writable --output-dir",
            errno.EACCES: "; check the permissions or choose another path",
            errno.EPERM: "; check the permissions or choose another path",
        }.get(e.errno, "")
        text = f"{where}{e.strerror}{hint}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def run_cli(main: Callable[[list[str]], int | None], prog: str, argv=None) -> int:
    """Call ``main(argv)`` and turn a user error into ``prog: error: ...`` and exit code 2.

    ``argv`` defaults to ``sys.argv[1:]``; ``--debug`` is removed from it before ``main``
    sees it. Returns the exit code (``sys.exit(run_cli(main, "tool.py"))``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        rc = main(argv)
    except StopRequested as e:  # a clean, saved stop: a message, not an error
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return EXIT_STOPPED["SIGINT"]
    except Exception as e:  # noqa: BLE001 - sorted into user errors and bugs just below
        if debug or not is_user_error(e):
            raise
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    return 0 if rc is None else int(rc)
