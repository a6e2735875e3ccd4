"""What every long run and every command-line tool shares, so they behave the same way.

- ``errors``: user mistakes end a tool with one line and exit code 2 (``--debug`` or
  ``RWDET_DEBUG=1`` shows the traceback);
- ``lock``: one run per output folder (the holder's PID and host named; a dead holder's lock
  is taken over);
- ``stop``: SIGTERM/SIGINT ask a run to finish its step, save and exit, instead of killing it.
"""

from rwdet.run.errors import EXIT_USAGE, UserError, run_cli
from rwdet.run.lock import OutputDirLock, OutputDirLocked
from rwdet.run.stop import EXIT_STOPPED, StopRequested, graceful_stop

__all__ = [
    "EXIT_STOPPED",
    "EXIT_USAGE",
    "OutputDirLock",
    "OutputDirLocked",
    "StopRequested",
    "UserError",
    "graceful_stop",
    "run_cli",
]
