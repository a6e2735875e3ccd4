"""The shared run-safety pieces: one-line user errors, the output-folder lock, stop signals,
and the graph check every stored-model load goes through."""

import os
import signal
import subprocess
import sys
import time

import pytest

from rwdet.graphs import graphs_fingerprint, graphs_to_dict
from rwdet.models import build_model, get_graphs
from rwdet.models.verify import GraphMismatchError, verify_graphs
from rwdet.run import OutputDirLock, OutputDirLocked, StopRequested, UserError, graceful_stop
from rwdet.run.errors import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raise(e):
    def main(argv):
        raise e

    return main


@pytest.mark.parametrize(
    "error,line",
    [
        (UserError("--k 3 is odd; use an even k"), "tool.py: error: --k 3 is odd; use an even k"),
        (OSError(28, "No space left on device", "out/x"), "'out/x': No space left on device; "),
        (OSError(30, "Read-only file system", "/ro"), "choose a writable --output-dir"),
        (FileNotFoundError(2, "No such file or directory", "w.pth"), "'w.pth': No such file"),
        (ValueError("two\n   lines"), "tool.py: error: two lines"),
        (FileNotFoundError("data root 'x' does not exist"), "error: data root 'x' does not"),
    ],
)
def test_user_errors_are_one_line_exit_2(error, line, capsys):
    assert run_cli(_raise(error), "tool.py", []) == 2
    err = capsys.readouterr().err
    assert line in err and err.count("\n") == 1 and "Traceback" not in err


def test_debug_flag_and_env_reraise_and_bugs_keep_their_traceback(monkeypatch):
    with pytest.raises(UserError):
        run_cli(_raise(UserError("x")), "tool.py", ["--debug"])
    monkeypatch.setenv("RWDET_DEBUG", "1")
    with pytest.raises(UserError):
        run_cli(_raise(UserError("x")), "tool.py", [])
    monkeypatch.delenv("RWDET_DEBUG")
    with pytest.raises(TypeError):  # a bug, not a user error
        run_cli(_raise(TypeError("x")), "tool.py", [])
    seen = []
    assert run_cli(lambda argv: seen.append(argv), "tool.py", ["a", "--debug", "b"]) == 0
    assert seen == [["a", "b"]]


def test_stop_requested_is_a_message_with_the_signal_exit_code(capsys):
    assert run_cli(_raise(StopRequested("SIGTERM", "iteration 7")), "t.py", []) == 143
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after iteration 7" in err and "resume with the same command" in err
    assert run_cli(_raise(KeyboardInterrupt()), "t.py", []) == 130
    assert capsys.readouterr().err == "t.py: interrupted\n"


def test_graceful_stop_turns_the_first_signal_into_a_flag_and_the_second_into_an_interrupt():
    before = signal.getsignal(signal.SIGTERM)
    with graceful_stop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)  # the handler runs between bytecodes
        assert stop.requested and stop.signame == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGTERM) is before


HOLD = "import sys, time; from rwdet.run import OutputDirLock; OutputDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"  # noqa: E501


def test_lock_names_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputDirLocked, match=rf"PID {holder.pid} on host .*--output-dir"):
            OutputDirLock(out).acquire()
    finally:
        holder.kill()  # SIGKILL: no clean-up runs; the kernel drops the flock
        holder.wait()
    with OutputDirLock(out) as lock:
        assert lock.held
        with pytest.raises(OutputDirLocked, match=str(os.getpid())):
            OutputDirLock(out).acquire()  # a second lock in the same process is refused too
    with OutputDirLock(out):  # released: taken again
        pass


def _tiny():
    model = build_model("randwire_small", gen="ws", seed=1, channels=8, nodes=6)
    spec = model.rwdet_spec
    graphs = get_graphs(model)
    return spec, graphs_to_dict(graphs), graphs_fingerprint(graphs)


def test_verify_graphs_refuses_edited_edges_and_graphs_of_another_spec():
    spec, stored, fp = _tiny()
    assert graphs_fingerprint(verify_graphs(stored, fp, "w.pth", spec)) == fp
    stage = next(iter(stored["graphs"]))
    edges = stored["graphs"][stage]["edges"]
    n = stored["graphs"][stage]["n"]
    absent = next([a, b] for a in range(n) for b in range(a + 1, n) if [a, b] not in edges)
    stored["graphs"][stage]["edges"] = [*edges[:-1], absent]  # same count: shapes still fit
    with pytest.raises(GraphMismatchError, match=r"w.pth: its graphs were changed .*"):
        verify_graphs(stored, fp, "w.pth")
    with pytest.raises(GraphMismatchError, match="requested model"):
        verify_graphs(stored, None, "w.pth", spec)  # an old file without fingerprint
    other = {**spec, "kwargs": {**spec["kwargs"], "seed": 2}}
    _, good, fp = _tiny()
    with pytest.raises(GraphMismatchError, match="pass the generator, parameters and seed"):
        verify_graphs(good, fp, "w.pth", other)


FORKED_CHILD_OUTLIVES = """
import os, sys, time
from rwdet.run import OutputDirLock
OutputDirLock(sys.argv[1]).acquire()
if os.fork() == 0:  # a DataLoader-like worker that outlives its parent for a while
    os.write(1, b'child\\n')  # after os.fork returned here: the at-fork hooks have run
    time.sleep(30)
    os._exit(0)
os.write(1, b'held\\n')  # one write per line: the two processes share the pipe
time.sleep(60)
"""


def test_a_forked_child_does_not_keep_a_killed_runs_lock(tmp_path):
    out = str(tmp_path / "run")
    proc = subprocess.Popen(
        [sys.executable, "-c", FORKED_CHILD_OUTLIVES, out],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        assert {proc.stdout.readline().strip() for _ in range(2)} == {"held", "child"}
        proc.kill()  # the parent dies; its forked child sleeps on
        proc.wait()
        with OutputDirLock(out):
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_atomic_files_get_the_umask_permissions_not_0600(tmp_path):
    from rwdet.atomic import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.pth"), lambda f: f.write(b"x"))
        os.umask(0o027)
        atomic_write(str(tmp_path / "b.pth"), lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a.pth").st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "b.pth").st_mode & 0o777 == 0o640


def test_disk_full_inside_torch_save_is_reported_as_the_os_error(tmp_path):
    import errno
    import io

    import torch

    from rwdet.atomic import atomic_write

    class Full(io.RawIOBase):  # a disk that fills up after the first kilobyte
        def __init__(self, f):
            self.f, self.n = f, 0

        def writable(self):
            return True

        def write(self, b):
            self.n += len(b)
            if self.n > 1024:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

    path = str(tmp_path / "last.pth")
    with pytest.raises(OSError) as info:  # torch.save itself raises a RuntimeError here
        atomic_write(path, lambda f: torch.save({"w": torch.zeros(4096)}, Full(f)))
    assert info.value.errno == errno.ENOSPC and info.value.filename == path
    assert os.listdir(tmp_path) == []  # no temp file left behind
    assert run_cli(_raise(info.value), "train_cls.py", []) == 2


def test_models_without_graphs_pass_the_check():
    # MobileNet-DNW and the ResNets have no GraphStage: the trainer stores the empty set's
    # edge lists and fingerprint, and resuming or converting them must not be refused.
    spec = {"name": "resnet50_dnw", "kwargs": {}}
    assert verify_graphs(graphs_to_dict({}), graphs_fingerprint({}), "w.pth", spec) == {}
    assert verify_graphs(None, None, "w.pth", spec) == {}
    randwire, stored, fp = _tiny()
    with pytest.raises(GraphMismatchError, match="requested model"):
        verify_graphs(graphs_to_dict({}), graphs_fingerprint({}), "w.pth", randwire)
