"""The CPU memory allocator the tools run under: tcmalloc when it is installed.

Why: RandWire's activations are many mid-sized tensors (2-22 MiB at C=109, batch 16), all
below glibc's mmap threshold, so glibc keeps the freed holes resident and a training step's
peak RSS is ~1.2x ResNet-50's; under tcmalloc it is 0.98x (docs/performance.md). PyTorch's
CPU tuning guide and its ``torch.backends.xeon.run_cpu`` launcher recommend the same. An
allocator can only be chosen before the process starts, so a tool's ``__main__`` calls
``use_preferred_allocator()`` first: it re-executes the same command (same PID, so torchrun
and SLURM still see their process) with ``LD_PRELOAD`` set.

``RWDET_ALLOCATOR`` chooses: ``auto`` (default: tcmalloc on a machine without an NVIDIA GPU,
when installed — ``make setup`` installs Debian's ``libtcmalloc-minimal4``), ``tcmalloc``
(also with a GPU; an error when missing), ``system`` (glibc's malloc), or the path of an
allocator library. An ``LD_PRELOAD`` the user set is always left as it is.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

CHOICES = ("auto", "tcmalloc", "system")
_MARK = "RWDET_ALLOCATOR_EXEC"  # set in the re-executed process: never exec twice
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib")
_TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")


def find_tcmalloc() -> str | None:
    for d in _LIB_DIRS:
        for name in _TCMALLOC:
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    found = ctypes.util.find_library("tcmalloc_minimal")
    return found if found and os.path.isabs(found) else None


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidiactl")  # no torch import: this runs before everything


def preferred_library(env=os.environ) -> str | None:
    """The allocator library to preload, or None for glibc's malloc; ``ValueError`` with the
    fix for a bad ``RWDET_ALLOCATOR``."""
    choice = env.get("RWDET_ALLOCATOR", "auto").strip() or "auto"
    if choice == "system":
        return None
    if choice not in CHOICES:
        if not os.path.isfile(choice):
            raise ValueError(
                f"RWDET_ALLOCATOR={choice!r} is neither one of {list(CHOICES)} nor an existing "
                "library file; unset it or use e.g. RWDET_ALLOCATOR=system"
            )
        return choice
    lib = find_tcmalloc()
    if choice == "tcmalloc" and lib is None:
        raise ValueError(
            "RWDET_ALLOCATOR=tcmalloc but tcmalloc is not installed; run make setup (or "
            "sudo apt-get install libtcmalloc-minimal4), or use RWDET_ALLOCATOR=system"
        )
    if choice == "auto" and _has_nvidia_gpu():
        return None
    return lib


def use_preferred_allocator() -> None:
    """Re-execute this command under the preferred allocator (see the module docstring);
    returns when nothing is to change. Call it first thing in a tool's ``__main__``."""
    if os.environ.get(_MARK) or os.environ.get("LD_PRELOAD"):
        return
    try:
        lib = preferred_library()
    except ValueError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if lib is None:
        return
    env = dict(os.environ, LD_PRELOAD=lib, **{_MARK: lib})
    # tcmalloc reports allocations above 1 GiB on stderr; a batch of images can be that big.
    env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def describe() -> str:
    """What this process runs under, for the run's log."""
    lib = os.environ.get(_MARK) or os.environ.get("LD_PRELOAD")
    return f"{os.path.basename(lib)} (LD_PRELOAD)" if lib else "glibc malloc"
