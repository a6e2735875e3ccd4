"""The tools' CPU allocator (``rwdet.run.allocator``): tcmalloc preloaded by re-executing the
same command in the same process; the user's choice (RWDET_ALLOCATOR, LD_PRELOAD) wins."""

import os
import subprocess
import sys

import pytest

from rwdet.run import allocator

SCRIPT = """
import os, sys
from rwdet.run.allocator import use_preferred_allocator, describe
use_preferred_allocator()
maps = open("/proc/self/maps").read()
print(os.getpid(), os.environ.get("LD_PRELOAD", ""), describe(), sys.argv[1:], sep="|")
print(os.environ.get("LD_PRELOAD", "-") in maps)
"""


def run(tmp_path, **env):
    script = tmp_path / "tool.py"
    script.write_text(SCRIPT)
    full = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "RWDET_ALLOCATOR")}
    full.update(env)
    proc = subprocess.Popen(
        [sys.executable, "-u", str(script), "--flag", "a b"],
        env=full,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate(timeout=60)
    return proc, out.splitlines(), err


def a_library() -> str:
    """A real shared library that is harmless to preload."""
    lib = allocator.find_tcmalloc()
    if lib:
        return lib
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"):
        path = os.path.join(d, "libc_malloc_debug.so.0")
        if os.path.isfile(path):
            return path
    pytest.skip("no preloadable library found on this machine")


def test_reexec_preloads_the_library_in_the_same_process(tmp_path):
    lib = a_library()
    proc, out, err = run(tmp_path, RWDET_ALLOCATOR=lib)
    assert proc.returncode == 0, err
    pid, preload, described, argv = out[0].split("|")
    assert int(pid) == proc.pid  # exec, not a child: torchrun and SLURM keep their process
    assert preload == lib and os.path.basename(lib) in described
    assert argv == "['--flag', 'a b']"  # the command line survives, spaces included
    assert out[1] == "True"  # the library is mapped


def test_the_users_choice_wins(tmp_path):
    lib = a_library()
    proc, out, _ = run(tmp_path, RWDET_ALLOCATOR="system")
    assert out[0].split("|")[1:3] == ["", "glibc malloc"]
    proc, out, _ = run(tmp_path, LD_PRELOAD=lib, RWDET_ALLOCATOR="tcmalloc")
    assert out[0].split("|")[1] == lib  # their LD_PRELOAD, untouched
    proc, out, err = run(tmp_path, RWDET_ALLOCATOR="jemallok")
    assert proc.returncode == 2 and out == []
    assert err.strip().count("\n") == 0 and "RWDET_ALLOCATOR='jemallok'" in err


def test_choice_rules(monkeypatch):
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: "/x/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(allocator, "_has_nvidia_gpu", lambda: False)
    assert allocator.preferred_library({}) == "/x/libtcmalloc_minimal.so.4"
    assert allocator.preferred_library({"RWDET_ALLOCATOR": "system"}) is None
    monkeypatch.setattr(allocator, "_has_nvidia_gpu", lambda: True)
    assert allocator.preferred_library({}) is None  # auto: CPU machines only
    assert allocator.preferred_library({"RWDET_ALLOCATOR": "tcmalloc"}).endswith(".so.4")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    assert allocator.preferred_library({}) is None
    with pytest.raises(ValueError, match="tcmalloc is not installed; run make setup"):
        allocator.preferred_library({"RWDET_ALLOCATOR": "tcmalloc"})


def test_setup_installs_tcmalloc():
    """make setup installs it where it can (Debian, root), so the default path is the lean one."""
    if not os.path.exists("/usr/bin/apt-get") or os.getuid() != 0:
        pytest.skip("make setup installs tcmalloc only with apt-get as root")
    assert allocator.find_tcmalloc() is not None
