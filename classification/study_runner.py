"""Running a study: each run is its own ``tools/train_cls.py`` process (same checkpoints,
resume and logs as a run started by hand), N at a time on CPU or one per GPU.

A run counts as finished when its ``metrics.jsonl`` holds an evaluation at the last epoch of
its schedule and ``last.pth`` exists: the trainer evaluates the last epoch after its final
step and only then saves (see ``classification.trainer.train_model``), so that record is exactly
what it leaves behind when a run ends normally. Finished runs are skipped; any other run is
started with the trainer's own auto-resume (``train.resume: true``), which continues an
interrupted run from its ``last.pth``.

Stopping: the first SIGINT/SIGTERM is passed on to every running trainer (each saves its
state after the current step and exits 130/143) and no new run starts; the study then exits
with the same code. A second signal passes on again: trainers stop without saving.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import yaml

from classification.study_spec import epochs_of
from rwdet.atomic import atomic_write
from rwdet.run.stop import EXIT_STOPPED, StopRequested

RECIPE = "study_run.yaml"  # the run's train_cls recipe, next to its checkpoints
LOG = "study.log"  # the trainer's stdout and stderr
TRAIN_CLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools",
                         "train_cls.py")  # fmt: skip


def last_eval(run_dir: str) -> dict | None:
    """The last evaluation record of a run's metrics.jsonl (None if there is none)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    found = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill: the runs before it stand
                continue
            if record.get("kind") == "eval":
                found = record
    return found


def run_state(run: dict) -> str:
    """ "done", "partial" (a last.pth to resume) or "new"."""
    has_last = os.path.isfile(os.path.join(run["dir"], "last.pth"))
    record = last_eval(run["dir"])
    if has_last and record is not None and record.get("epoch") == epochs_of(run["recipe"]):
        return "done"
    return "partial" if has_last else "new"


def run_record(run: dict) -> dict:
    """What the aggregation needs of one run (top1 None unless it finished)."""
    state = run_state(run)
    record = last_eval(run["dir"]) if state == "done" else None
    return {
        "name": run["name"], "group": run["group"], "label": run["label"],
        "baseline": run["baseline"], "axes": run["axes"], "state": state,
        "top1": record["top1"] if record else None, "top5": record["top5"] if record else None,
        "epochs": epochs_of(run["recipe"]), "dir": run["dir"],
    }  # fmt: skip


def command(run: dict) -> list[str]:
    return [sys.executable, TRAIN_CLS, "--config", os.path.join(run["dir"], RECIPE)]


def write_recipe(run: dict) -> None:
    text = "# written by tools/study.py; edit the study spec instead\n" + yaml.safe_dump(
        run["recipe"], sort_keys=False
    )
    atomic_write(os.path.join(run["dir"], RECIPE), lambda f: f.write(text), mode="w")


class Runner:
    """Runs the given runs, ``slots`` at a time (one slot per GPU when ``gpus`` are given)."""

    def __init__(self, runs, jobs: int = 1, gpus=None, threads=None, log=print, poll=0.2):
        self.runs, self.log, self.poll = list(runs), log, poll
        self.gpus = list(gpus) if gpus else None
        self.slots = len(self.gpus) if self.gpus else max(1, jobs)
        self.threads = threads
        self.signame: str | None = None
        self.failed: list[tuple[str, int]] = []

    def _env(self, slot: int) -> dict:
        env = dict(os.environ)
        if self.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(self.gpus[slot])
        return env

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        first = self.signame is None
        self.signame = self.signame or name
        for proc, _run, _slot in self.active:
            if proc.poll() is None:
                try:
                    proc.send_signal(signum)
                except ProcessLookupError:
                    pass
        if first:
            self.log(f"{name}: stopping the {len(self.active)} running run(s) after their "
                     f"current step; rerun the same command to resume")  # fmt: skip

    def run(self) -> None:
        pending = [r for r in self.runs if run_state(r) != "done"]
        self.active: list = []
        free = list(range(self.slots))
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        total, started = len(pending), 0
        try:
            while (pending and self.signame is None) or self.active:
                while pending and free and self.signame is None:
                    run, slot = pending.pop(0), free.pop(0)
                    started += 1
                    if self.threads and "threads" not in run["recipe"]:
                        run = {**run, "recipe": {**run["recipe"], "threads": self.threads}}
                    write_recipe(run)
                    state = run_state(run)
                    log_file = open(os.path.join(run["dir"], LOG), "a")  # noqa: SIM115
                    proc = subprocess.Popen(
                        command(run), stdout=log_file, stderr=subprocess.STDOUT,
                        env=self._env(slot), start_new_session=True,
                    )  # fmt: skip
                    log_file.close()
                    where = f" on GPU {self.gpus[slot]}" if self.gpus else ""
                    verb = "resuming" if state == "partial" else "starting"
                    self.log(f"[{started}/{total}] {verb} {run['name']}{where}")
                    self.active.append((proc, run, slot))
                time.sleep(self.poll)
                for item in list(self.active):
                    proc, run, slot = item
                    code = proc.poll()
                    if code is None:
                        continue
                    self.active.remove(item)
                    free.append(slot)
                    if code == 0:
                        top1 = (last_eval(run["dir"]) or {}).get("top1")
                        self.log(f"done {run['name']}: top-1 {top1}")
                    elif code in EXIT_STOPPED.values():
                        self.log(f"stopped {run['name']} (saved; it resumes on the next run)")
                    else:
                        self.failed.append((run["name"], code))
                        self.log(f"FAILED {run['name']} (exit {code}); see "
                                 f"{os.path.join(run['dir'], LOG)}")  # fmt: skip
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if self.signame:
            raise StopRequested(self.signame, f"{started} of {total} run(s) started")
