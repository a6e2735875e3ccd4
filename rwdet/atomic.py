"""Atomic file writes: a crash at any moment leaves the old file or the new one, never a torn one.

Every checkpoint, weights file, graph artifact and converted annotation in rwdet goes through
``atomic_write``: write a temp file in the same folder, flush and fsync it, rename it over the
target (``os.replace`` is atomic within a file system).
"""

from __future__ import annotations

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
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
