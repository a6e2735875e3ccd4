"""Preemption-safe runs: SIGTERM/SIGINT finish the current step, save, and exit non-zero.

SLURM and Kubernetes send SIGTERM some seconds before they kill a job; Ctrl-C sends SIGINT.
Inside ``with graceful_stop() as stop:`` the first such signal only sets ``stop.requested``;
the training loop checks it after each step (ranks agree through an all-reduce), writes a
checkpoint atomically and raises ``StopRequested``, which the tools turn into the line
"stopped by SIGTERM ..., resume with the same command" and ``exit_code``. A second signal
while stopping interrupts at once (``KeyboardInterrupt``), for a user who does not want to
wait for the save.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

# Exit code of a run stopped by a signal: the shell's 128 + signal number (143 for SIGTERM,
# 130 for SIGINT), so schedulers and scripts see "ended by that signal", after a clean save.
EXIT_STOPPED = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """The run saved its state after a stop signal; resuming with the same command continues."""

    def __init__(self, signame: str, where: str = ""):
        self.signame = signame
        text = f"stopped by {signame}"
        if where:
            text += f" after {where}"
        super().__init__(text + "; the state is saved: resume with the same command")

    @property
    def exit_code(self) -> int:
        return EXIT_STOPPED.get(self.signame, 128 + signal.SIGTERM)


class StopFlag:
    def __init__(self):
        self.signame: str | None = None

    @property
    def requested(self) -> bool:
        return self.signame is not None

    def request(self, signame: str = "request") -> None:
        """Ask for a stop (what the signal handler does; also for tests and callbacks)."""
        if self.signame is None:
            self.signame = signame


@contextmanager
def graceful_stop():
    """Handle SIGTERM/SIGINT as stop requests for the block (main thread only; elsewhere the
    flag is returned without handlers, and signals keep their default action)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:  # second signal: the user does not want to wait
            raise KeyboardInterrupt
        flag.request(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
