"""Where metrics go: text log, JSON lines, TensorBoard, and a tqdm bar on a terminal.

Only rank 0 writes files. On a terminal the training loop shows a tqdm bar; elsewhere (a log
file, CI, a cluster job) it prints a plain line every ``train.log_period`` iterations instead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys

from tqdm import tqdm

LOG_NAME = "classification"
FILE_LOG_NAME = "classification.file"


def setup_logging(output_dir: str | None, is_main: bool) -> logging.Logger:
    """Console (rank 0: INFO, others: WARNING) plus ``<output_dir>/log.txt`` on rank 0."""
    log = logging.getLogger(LOG_NAME)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()  # closes log files; a console handler leaves sys.stdout open
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    console.setFormatter(fmt)
    log.addHandler(console)
    # File-only twin: periodic lines still reach log.txt while a tqdm bar owns the terminal.
    file_log = logging.getLogger(FILE_LOG_NAME)
    file_log.setLevel(logging.INFO)
    file_log.propagate = False
    for h in list(file_log.handlers):
        file_log.removeHandler(h)
    if is_main and output_dir:
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"))
        fh.setFormatter(fmt)
        log.addHandler(fh)
        file_log.addHandler(fh)
    # Which execution path the graph stages take (rwdet.nn.execution, once per model) is
    # printed and kept in log.txt with the run's own lines.
    logging.getLogger("rwdet.nn.execution").handlers = list(log.handlers)
    logging.getLogger("rwdet.nn.execution").setLevel(logging.INFO)
    return log


def use_progress_bar() -> bool:
    return sys.stderr.isatty()


def progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, leave=False)


class MetricWriter:
    """Appends JSON lines to ``metrics.jsonl`` and scalars to TensorBoard (rank 0 only)."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True):
        self.output_dir, self.enabled, self.tensorboard = output_dir, enabled, tensorboard
        self.tb = None
        self.file = None
        self.open()

    def open(self) -> None:
        """(Re)open the files: after ``close()``, e.g. once a previous run's were moved aside."""
        if not self.enabled or self.file is not None:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        self.file = open(os.path.join(self.output_dir, "metrics.jsonl"), "a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(self.output_dir, "tb"))

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "iteration": step, **values}
        self.file.write(json.dumps(record, default=float) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
            self.tb.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
