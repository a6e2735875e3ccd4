"""Preemption-safe detection training: a SIGTERM/SIGINT ends the step, saves, and stops.

SLURM and Kubernetes send SIGTERM some seconds before they kill a job. Without this hook
detectron2 dies at once and loses everything since the last periodic checkpoint. The signal
handler (``rwdet.run.stop.graceful_stop``) only sets a flag; ``StopOnSignal.after_step`` reads
it once the step is complete and the LR scheduler has stepped, so the saved state is exactly
"iteration N done": ``model_{N:07d}.pth`` with ``iteration=N``, from which auto-resume starts
at N + 1, as after a periodic checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading

from detectron2.engine import HookBase
from detectron2.utils import comm

from rwdet.run.stop import StopFlag, StopRequested

logger = logging.getLogger(__name__)


def agreed_signal(*flags) -> str | None:
    """The stop signal if any rank got one: every rank must stop at the same iteration, or the
    others would wait forever in the next step's all-reduce."""
    mine = next((f.signame for f in flags if f.requested), None)
    if comm.get_world_size() == 1:
        return mine
    names = [n for n in comm.all_gather(mine) if n]
    return names[0] if names else None


class StopOnSignal(HookBase):
    """Register before ``PeriodicCheckpointer`` (and on every rank: it holds a collective)."""

    def __init__(self, *flags):
        self.flags = flags
        self._told = False

    def after_step(self):
        signame = agreed_signal(*self.flags)
        if signame is None:
            return
        it = self.trainer.iter
        if it + 1 >= self.trainer.max_iter:
            # The run ends with this step anyway: its final checkpoint and evaluation follow.
            if not self._told:
                logger.info("%s during the last iteration: finishing the run", signame)
                self._told = True
            return
        self.trainer.checkpointer.save(f"model_{it:07d}", iteration=it)
        comm.synchronize()  # no rank exits (and has the launcher kill the rest) mid-save
        raise StopRequested(signame, f"iteration {it}")


class QuietStop(logging.Filter):
    """``TrainerBase.train`` logs every exception with its traceback before re-raising; a
    requested stop is not a failure, so its record is dropped (the CLI prints one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StopRequested)


def quiet_stop_logging() -> None:
    log = logging.getLogger("detectron2.engine.train_loop")
    if not any(isinstance(f, QuietStop) for f in log.filters):
        log.addFilter(QuietStop())


# A launcher (tools/train_net.py with --num-gpus > 1) passes its SIGTERM/SIGINT on to the
# workers as these signals: a worker may also get the original signal itself (Ctrl-C reaches
# the whole process group, SLURM signals every process), and a second SIGTERM/SIGINT would
# mean "abort now"; a forwarded one only asks for the stop, however often it arrives, and in
# whichever order with the original (Python runs pending handlers in signal-number order).
FORWARDED = {signal.SIGUSR1: "SIGTERM", signal.SIGUSR2: "SIGINT"}


@contextlib.contextmanager
def forwarded_stop():
    """In a spawned worker: a flag that the launcher's forwarded signals set. It is not
    ``graceful_stop``'s flag, which would take a direct signal after it for a second one."""
    flag = StopFlag()
    if comm.get_world_size() == 1 or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {
        s: signal.signal(s, lambda signum, _f: flag.request(FORWARDED[signum])) for s in FORWARDED
    }
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def forward_stop_to_workers():
    """In the launcher: the first SIGTERM/SIGINT is passed on to the live workers as a stop
    request and the launcher waits for them to save (dying at once would kill them mid-save:
    torch gives each worker SIGINT when its parent dies); a second one is passed on as is."""
    seen = []

    def handler(signum, _frame):
        first = not seen
        seen.append(signum)
        to_send = {v: k for k, v in FORWARDED.items()}[signal.Signals(signum).name]
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, to_send if first else signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
