#!/usr/bin/env python
"""Run a study (a grid of tools/train_cls.py runs) and draw the edge-popup paper's figures.

    python tools/study.py configs/studies/popup_k_sweep.yaml --preset quick      # CPU, minutes
    python tools/study.py configs/studies/popup_k_sweep.yaml --data cifar10:/data --gpus 0,1,2,3
    python tools/study.py SPEC.yaml --preset quick --aggregate-only   # table/figures so far

Each run is an independent train_cls.py process with its own folder under OUT/runs/ (named
from its group and settings): finished runs are skipped, interrupted ones resume from their
last.pth, and Ctrl-C stops every running trainer after a clean save. OUT gets results.json
(every run), results.md (mean ± std over seeds) and one PNG per figure of the spec.
Specs: configs/studies/ (format: classification/study_spec.py; guide: docs/studies.md).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from classification.study_runner import Runner, run_record  # noqa: E402
from classification.study_spec import expand, resolve_spec  # noqa: E402
from rwdet.analysis.study import write_outputs  # noqa: E402
from rwdet.run.errors import UserError, run_cli  # noqa: E402
from rwdet.run.lock import OutputDirLock  # noqa: E402
from rwdet.run.stop import StopRequested  # noqa: E402

PROG = "study.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("spec", help="study spec YAML, e.g. configs/studies/popup_k_sweep.yaml")
    p.add_argument("--preset", help="a preset of the spec (e.g. quick)")
    p.add_argument(
        "--data", help="fashion_mnist[:DIR], cifar10:ROOT or cifar100:ROOT (default: the spec's)"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at once on CPU (default 1)")
    p.add_argument("--gpus", help="comma-separated GPU ids: one run per GPU at a time")
    p.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    p.add_argument("--out", help="study folder (default: output/studies/<name>/<preset>_<data>)")
    p.add_argument("--list", action="store_true", help="list the runs and their state, and exit")
    p.add_argument(
        "--aggregate-only", action="store_true", help="write the table and figures, run nothing"
    )
    return p


def _gpus(text: str | None) -> list[str] | None:
    if text is None:
        return None
    ids = [g.strip() for g in text.split(",") if g.strip()]
    if not ids or not all(g.isdigit() for g in ids):
        raise UserError(f"--gpus {text!r}: expected comma-separated GPU ids such as 0,1")
    return ids


def study(argv: list[str]) -> int:
    a = build_parser().parse_args(argv)
    if a.jobs < 1:
        raise UserError(f"--jobs {a.jobs}: expected at least 1")
    if a.threads is not None and a.threads < 1:
        raise UserError(f"--threads {a.threads}: expected at least 1")
    gpus = _gpus(a.gpus)
    spec = resolve_spec(a.spec, a.preset, a.data)
    out = a.out or os.path.join(
        "output", "studies", spec["name"], f"{a.preset or 'full'}_{spec['data']}"
    )
    runs = expand(spec, out)
    if gpus:
        for r in runs:
            r["recipe"].setdefault("device", "cuda")
    records = [run_record(r) for r in runs]
    done = sum(r["state"] == "done" for r in records)
    print(f"study {spec['name']} ({a.preset or 'full'} preset, {spec['data']}): {len(runs)} "
          f"runs, {done} finished; folder {out}", flush=True)  # fmt: skip
    if spec["note"]:
        print(f"preset: {spec['note']}", flush=True)
    if a.list:
        for r in records:
            print(f"  {r['state']:8s} {r['name']}")
        return 0
    failed, stopped = [], None
    if not a.aggregate_only:
        with OutputDirLock(out, what="study", setting="--out"):
            slots = len(gpus) if gpus else a.jobs
            threads = a.threads or (None if gpus else max(1, (os.cpu_count() or 1) // slots))
            runner = Runner(runs, a.jobs, gpus, threads, log=lambda m: print(m, flush=True))
            try:
                runner.run()
            except StopRequested as e:  # still write what is finished, then stop
                stopped = e
            failed = runner.failed
        records = [run_record(r) for r in runs]
    _report(records, spec, out)
    if stopped is not None:
        raise stopped
    if failed:
        names = ", ".join(f"{n} (exit {c})" for n, c in failed)
        print(f"{PROG}: {len(failed)} run(s) failed: {names}", file=sys.stderr)
        return 1
    return 0


def _report(records: list[dict], spec: dict, out: str) -> None:
    meta = {k: spec[k] for k in ("name", "reproduces", "preset", "note", "data")}
    written = write_outputs(records, spec["figures"], out, meta)
    print(written["markdown"], end="")
    print(f"table: {written['table']}\nresults: {written['json']}")
    for path in written["figures"]:
        print(f"figure: {path}")


def main(argv=None) -> int:
    return run_cli(study, PROG, argv)


if __name__ == "__main__":
    sys.exit(main())
