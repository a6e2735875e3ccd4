"""Atomic file writes: a crash at any moment leaves the old file or the new one, never a torn one.

Every checkpoint, weights file, graph artifact and converted annotation in rwdet goes through
``atomic_write``: write a temp file in the same folder, flush and fsync it, rename it over the
target (``os.replace`` is atomic within a file system).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
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
