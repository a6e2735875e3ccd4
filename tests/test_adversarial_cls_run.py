"""One run per output folder, preemption-safe signals and one-line DDP mismatches (train_cls).

The adversarial cases of issue #13 for the run itself: a second run on a busy folder, a lock
left by a SIGKILLed run, SIGTERM (a scheduler's preemption warning) and SIGINT (Ctrl-C) in the
middle of training, one rank signalled alone, and ranks that see different class folders.
"""

import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_cls_config import load_tool
from test_cls_data import make_image_folder
from test_cls_train import ENV, TOOL, tiny_args, tiny_cfg

from classification import trainer
from classification.checkpoint import load_checkpoint
from rwdet.run.lock import LOCK_NAME, OutputDirLock

TIMEOUT = timedelta(seconds=30)
HOLD_LOCK = (
    "import sys, time; from rwdet.run.lock import OutputDirLock; "
    "OutputDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """2 classes x 8 training images: 4 iterations per epoch at a global batch of 4."""
    root = str(tmp_path_factory.mktemp("small"))
    make_image_folder(root, classes=2, train_per_class=8, val_per_class=2, bad=False)
    return root


def small_args(data, out, *extra):
    return tiny_args(
        data, out, epochs=1,
        extra=["--batch-size", "4", "train.precise_bn", "0", "train.complexity", "false", *extra],
    )  # fmt: skip


def hold_lock_in_subprocess(folder):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, folder], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_busy_folder_is_refused_and_a_dead_runs_lock_taken_over(small_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = hold_lock_in_subprocess(out)
    try:
        code = load_tool().main(small_args(small_data, out))
        err = capsys.readouterr().err
        assert code == 2, err
        assert f"PID {holder.pid} on host {socket.gethostname()}" in err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        # Refused before touching the folder: no log, no config, no checkpoint of its own.
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        holder.kill()  # SIGKILL: no clean-up; the kernel drops the flock
        holder.wait()
    assert load_tool().main(small_args(small_data, out)) == 0
    assert load_checkpoint(os.path.join(out, "last.pth"))["iteration"] == 4
    with open(os.path.join(out, LOCK_NAME)) as f:
        assert f'"pid": {os.getpid()}' in f.read()  # this run took the folder over


def _start(data, out, extra=(), **kw):
    """train_cls.py for 2 epochs of 4 iterations, as a subprocess."""
    cmd = [sys.executable, TOOL, *small_args(data, out, "--epochs", "2", *extra)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kw
    )
    return cmd, proc


def _wait_for(proc, text):
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return seen
    raise AssertionError("".join(seen[-30:]) + proc.stderr.read())


def _stopped_cleanly(proc, signame, code):
    """The run exits 128+signal with one stderr line, no traceback, and says where it stopped;
    returns that iteration."""
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stdout[-2000:] + stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = [ln for ln in stderr.splitlines() if ln.startswith("train_cls.py:")]
    assert len(lines) == 1 and f"stopped by {signame} after iteration" in lines[0], stderr
    n = int(lines[0].split("after iteration ")[1].split(";")[0])
    assert f"stopped by {signame} at iteration {n}; resume with the same command" in stdout
    return n


@pytest.mark.slow
def test_sigterm_saves_and_the_same_command_resumes_exactly(small_data, tmp_path, capsys):
    """SIGTERM mid-epoch: the step finishes, last.pth is written, exit 143; the same command
    then continues at the next iteration and ends with exactly the weights of a run that was
    never stopped (edge drop and dropout on, so the RNG state must be the saved one)."""
    rand = ["model.kwargs", "{stem: small, head_channels: 32, edge_drop: 0.3, dropout: 0.2}"]
    ref_out, cut_out = str(tmp_path / "ref"), str(tmp_path / "cut")
    _, ref = _start(small_data, ref_out, rand)
    cmd, victim = _start(small_data, cut_out, rand)
    _wait_for(victim, "epoch 1/2 iter 2/4")
    # While it trains, the folder is its own: a second run is refused, naming it.
    assert load_tool().main(small_args(small_data, cut_out)) == 2
    assert f"PID {victim.pid} on host" in capsys.readouterr().err
    victim.send_signal(signal.SIGTERM)
    n = _stopped_cleanly(victim, "SIGTERM", 128 + signal.SIGTERM)
    assert 2 <= n < 8
    assert load_checkpoint(os.path.join(cut_out, "last.pth"))["iteration"] == n
    resumed = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f", iteration {n}\n" in resumed.stdout
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    a = load_checkpoint(os.path.join(ref_out, "last.pth"))
    b = load_checkpoint(os.path.join(cut_out, "last.pth"))
    assert a["iteration"] == b["iteration"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after the stop"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_the_process_group_saves_and_exits_128_plus_signal(small_data, tmp_path, sig):
    """Ctrl-C (SIGINT) and SLURM's preemption warning (SIGTERM) signal the whole process group,
    data-loading workers included: the workers must not die of it mid-save."""
    out = str(tmp_path / "run")
    _, proc = _start(small_data, out, ["data.workers", "1"], start_new_session=True)
    _wait_for(proc, "epoch 1/2 iter 2/4")
    os.killpg(proc.pid, sig)
    n = _stopped_cleanly(proc, signal.Signals(sig).name, 128 + sig)
    assert 2 <= n < 8
    assert load_checkpoint(os.path.join(out, "last.pth"))["iteration"] == n


# ---------------------------------------------------------------------------- two ranks


def _rank_worker(rank, store, case, data, out, results):
    """One rank of a gloo job running the trainer; writes what it raised to results.<rank>."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    # A short timeout: ranks that disagree fail the test instead of hanging it.
    init = f"file://{store}"
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=TIMEOUT)
    torch.set_num_threads(1)
    if case == "signal" and rank == 1:  # a SIGTERM that reaches rank 1 alone, in step 3
        step, calls = torch.optim.SGD.step, []

        def signalled_step(self, *a, **k):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return step(self, *a, **k)

        torch.optim.SGD.step = signalled_step
    cfg = tiny_cfg(*small_args(data[rank] if isinstance(data, list) else data, out))
    try:
        trainer.main(cfg)
        msg = "no error"
    except Exception as e:  # noqa: BLE001 - the test checks what each rank raised
        msg = f"{type(e).__name__}: {e}"
    with open(f"{results}.{rank}", "w") as f:
        f.write(msg)


def _two_ranks(tmp_path, case, data, out):
    results = str(tmp_path / "result")
    mp.start_processes(
        _rank_worker,
        args=(str(tmp_path / "store"), case, data, out, results),
        nprocs=2,
        start_method="fork",  # the children share the parent's imports: seconds, not a minute
    )
    return [open(f"{results}.{rank}").read() for rank in range(2)]


def test_one_signalled_rank_stops_both_at_the_same_iteration(small_data, tmp_path):
    out = str(tmp_path / "run")
    msgs = _two_ranks(tmp_path, "signal", small_data, out)
    for msg in msgs:
        assert msg.startswith("StopRequested: stopped by SIGTERM after iteration 3;"), msgs
    ckpt = load_checkpoint(os.path.join(out, "last.pth"))
    assert ckpt["iteration"] == 3 and len(ckpt["rng"]) == 2


def test_different_class_folders_per_rank_fail_on_both_in_one_line(small_data, tmp_path):
    # Each node lists its own copy of the data, and rank 1's has a third class.
    more = str(tmp_path / "node1_data")
    make_image_folder(more, classes=3, train_per_class=8, val_per_class=2, bad=False)
    msgs = _two_ranks(tmp_path, "classes", [small_data, more], str(tmp_path / "run"))
    for msg in msgs:
        assert msg.startswith(
            "UserError: the data differs across ranks (rank 0 has 2 classes,"
            " rank 1 has 3; the first difference is class #2"
        ), msgs
        assert "\n" not in msg and "shared by all nodes" in msg


def test_busy_folder_fails_on_every_rank(small_data, tmp_path):
    out = str(tmp_path / "run")
    with OutputDirLock(out):  # held here; the forked ranks open the lock file anew
        msgs = _two_ranks(tmp_path, "locked", small_data, out)
    assert msgs[0].startswith("OutputDirLocked: ") and f"PID {os.getpid()} " in msgs[0], msgs
    assert msgs[1].startswith("UserError: rank 0 could not take the output folder: ")
    assert f"PID {os.getpid()} " in msgs[1]
