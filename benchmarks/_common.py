"""Helpers shared by the benchmarks: one model per fresh worker process, its peak memory, the
environment record, and ratios against a baseline row.

A worker prints one JSON line last on stdout; the parent reads it back (or the worker's last
error line). CPU peak memory is the worker's peak RSS (``ru_maxrss``), which is that model's
alone because nothing else ran in the process; on CUDA it is ``max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys

# Set in a benchmark process that re-executed itself under ``--preload`` (never twice).
_PRELOAD_EXEC = "RWDET_BENCH_PRELOAD_EXEC"


def peak_bytes(device) -> int:
    """Peak memory of this process so far: CUDA ``max_memory_allocated`` or CPU peak RSS."""
    import torch

    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # KiB on Linux


def preload_error(path: str) -> str | None:
    """Why ``--preload path`` cannot be honoured, or None. Checked before any process starts:
    the dynamic loader only warns about a missing library and runs on with glibc's malloc,
    which would measure the wrong allocator under the right label."""
    if not path or os.path.isfile(path):
        return None
    from rwdet.run.allocator import find_tcmalloc

    example = find_tcmalloc() or "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    return f"--preload {path!r}: no such file; give an allocator library's path, e.g. {example}"


def preload_mapped(path: str) -> bool | None:
    """Whether the library ``path`` is loaded in this process (None where /proc cannot tell)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    real = os.path.realpath(path)
    return any(
        os.path.realpath(line.split(maxsplit=5)[-1]) == real
        for line in maps.splitlines()
        if line.count(" ") >= 5 and "/" in line
    )


def check_preloaded() -> None:
    """In a worker: fail (an error row naming the library) when the ``LD_PRELOAD`` the parent
    set did not load, e.g. a file that is not a shared library."""
    path = os.environ.get("LD_PRELOAD", "")
    if path and ":" not in path and preload_mapped(path) is False:
        raise RuntimeError(f"--preload {path!r} was not loaded (is it a shared library?)")


def exec_preloaded(path: str, script: str, argv: list[str]) -> str | None:
    """Re-execute this benchmark under ``LD_PRELOAD=path`` unless it already runs under it:
    a mode that measures in its own process (``--inference``) can take another allocator only
    at process start. Returns None once the library is loaded, or why it did not load."""
    if not path:
        return None
    loaded = preload_mapped(path)
    if loaded or (loaded is None and os.environ.get("LD_PRELOAD") == path):
        return None  # loaded, or (no /proc to tell) already set by us or the caller
    if os.environ.get(_PRELOAD_EXEC):
        return f"--preload {path!r} was not loaded (is it a shared library?)"
    env = dict(os.environ, LD_PRELOAD=path, **{_PRELOAD_EXEC: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, script, *argv], env)


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
