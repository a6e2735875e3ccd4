"""One run per output folder: an exclusive ``flock`` on ``<output_dir>/.rwdet.lock``.

Two runs writing one folder would resume each other's half-written checkpoints and interleave
their metrics. The lock is an advisory ``fcntl.flock``: the kernel drops it when its process
dies (even by SIGKILL), so a lock left by a dead run is taken over without any clean-up (forked
children such as DataLoader workers close their inherited copy, so they cannot prolong it). The
file holds the holder's PID, host and start time, for the second run's error message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from rwdet.run.errors import UserError

LOCK_NAME = ".rwdet.lock"
_HELD: set[int] = set()  # lock fds this process holds


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker), close the inherited lock fds: a worker that
    outlives a SIGKILLed run by a few seconds must not keep the folder locked. Closing (not
    unlocking) leaves the parent's lock in place."""
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class OutputDirLocked(UserError):
    """Another live process holds the output folder."""


class OutputDirLock:
    """``with OutputDirLock(dir):`` holds the folder for the block (or ``acquire``/``release``)."""

    def __init__(self, output_dir: str, what: str = "run", setting: str = "--output-dir"):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.what = what
        self.setting = setting  # how the user names the folder (a flag, or a config key)
        self._fd: int | None = None

    def acquire(self) -> OutputDirLock:
        os.makedirs(self.output_dir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputDirLocked(
                f"output folder {self.output_dir!r} is in use by another {self.what} "
                f"({holder}); wait for it to finish, stop it, or choose another {self.setting}"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: unlinking it would let a third run lock a new inode while a
            # second one still waits on the old one.
            _HELD.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"PID {info['pid']} on host {info['host']}, since {since}"
    except (ValueError, KeyError, TypeError, OSError):
        return "holder unknown"
