"""Atomic file writes: a crash at any moment leaves the old file or the new one, never a torn one.

Every checkpoint, weights file, graph artifact and converted annotation in rwdet goes through
``atomic_write``: write a temp file in the same folder, flush and fsync it, rename it over the
target (``os.replace`` is atomic within a file system). The file gets the permissions a plain
``open()`` would give (0666 less the umask: 0644 under umask 022), not the temp file's 0600, so
teammates on a shared cluster can read checkpoints. A write that fails for lack of space or
permission raises that ``OSError`` (naming the target), even where ``torch.save`` wraps it in
a ``RuntimeError``, so the tools report it as one line.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import tempfile
from collections.abc import Callable, Iterable
from typing import IO


def atomic_write(path: str, write: Callable[[IO], None], mode: str = "wb") -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path), suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        cause = _user_os_error(e)
        if cause is not None and cause is not e:
            raise OSError(cause.errno, cause.strerror, path) from e
        raise


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


def _user_os_error(e: BaseException | None) -> OSError | None:
    """The OSError (disk full, read-only, ...) behind ``e``, following its chained causes."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _umask() -> int:
    """The process umask. Linux shows it in /proc (no side effect); elsewhere it is read by
    setting and restoring it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temp_files(directory: str, names: Iterable[str]) -> list[str]:
    """Delete the temp files killed saves left in ``directory``; returns their names.

    ``atomic_write`` names its temp file ``.<target><random>.tmp`` and removes it on any
    exception, but SIGKILL (OOM killer, a scheduler's hard kill) skips that, and nothing would
    ever delete it. ``names`` are the targets' basenames or glob patterns (``model_*.pth``).
    Call it before the run saves anything, while no other process writes to ``directory``.
    """
    if not os.path.isdir(directory):
        return []
    patterns = [f".{name}*.tmp" for name in names]
    stale = [f for f in os.listdir(directory) if any(fnmatch.fnmatchcase(f, p) for p in patterns)]
    for f in stale:
        os.remove(os.path.join(directory, f))
    return stale
