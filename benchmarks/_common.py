"""Helpers shared by the benchmarks: one model per fresh worker process, its peak memory, the
environment record, and ratios against a baseline row.

A worker prints one JSON line last on stdout; the parent reads it back (or the worker's last
error line). CPU peak memory is the worker's peak RSS (``ru_maxrss``), which is that model's
alone because nothing else ran in the process; on CUDA it is ``max_memory_allocated``.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import subprocess


def peak_bytes(device) -> int:
    """Peak memory of this process so far: CUDA ``max_memory_allocated`` or CPU peak RSS."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def run_json_worker(cmd: list[str], name: str, env: dict | None = None, timeout=None) -> dict:
    """Run one worker process; its last stdout line is a JSON object. On failure a row
    ``{"model": name, "error": [last stderr line]}``."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "error": [f"timed out after {timeout} s"]}
    if out.returncode != 0:
        return {"model": name, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_rows(results: dict[str, list[dict]], keys, baseline: str, ratios: dict) -> list[dict]:
    """One row per model: the median over rounds of ``keys``, and ``ratios`` (``{ratio_name:
    key}``) of that median to the baseline model's median. Models with no successful round get
    a ``note`` (the first round's ``skipped`` or ``error``)."""
    first = keys[0]
    base_runs = [r for r in results.get(baseline, []) if first in r]
    base = None
    if base_runs:
        present = [k for k in keys if k in base_runs[0]]
        base = {k: statistics.median(r[k] for r in base_runs) for k in present}
    rows = []
    for model, runs in results.items():
        ok = [r for r in runs if first in r]
        if not ok:
            rows.append({"model": model, "note": runs[0].get("skipped") or runs[0].get("error")})
            continue
        row = {"model": model, "rounds": len(ok)}
        for key in keys:
            if key in ok[0]:
                row[key] = statistics.median(r[key] for r in ok)
        if base:
            for name, key in ratios.items():
                if key in row and base.get(key):
                    row[name] = row[key] / base[key]
        rows.append(row)
    return rows


def base_environment(device: str, threads: int) -> dict:
    import torch

    env = {
        "device": device,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": threads or torch.get_num_threads(),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env
