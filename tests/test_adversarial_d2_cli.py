"""tools/train_net.py against hostile or mistaken input: code in YAML, bad overrides, eval-only
without weights, a second run on a busy OUTPUT_DIR, and SIGTERM mid-training (issue 13)."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_d2_train import TRAIN_NET, make_coco, write_config

from rwdet.run.errors import run_cli
from rwdet.run.lock import OutputDirLock

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "frcnn_randwire_demo.yaml")
EVIL = 'MODEL:\n  WEIGHTS: !!python/object/apply:os.system ["touch {marker}"]\n'


def load_tool():
    spec = importlib.util.spec_from_file_location("train_net", TRAIN_NET)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def train_net(argv, capsys):
    """The CLI in this process: exit code and the stderr lines it printed."""
    code = run_cli(load_tool().cli, "train_net.py", argv)
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def env_for(datasets):
    return {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}


def test_python_tag_in_config_is_refused_not_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.yaml"
    evil.write_text(EVIL.format(marker=tmp_path / "MARKER"))
    code, err = train_net(["--config-file", str(evil), "--eval-only"], capsys)
    assert code == 2 and len(err) == 1, err
    assert str(evil) in err[0] and "python/object/apply:os.system" in err[0]
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.slow
def test_python_tag_in_a_base_config_is_refused_by_the_real_cli(tmp_path):
    """The issue's case: `--eval-only` on a config whose _BASE_ carries the tag."""
    (tmp_path / "evil_base.yaml").write_text(EVIL.format(marker=tmp_path / "MARKER"))
    child = tmp_path / "child.yaml"
    child.write_text('_BASE_: "evil_base.yaml"\nSOLVER:\n  BASE_LR: 0.1\n')
    proc = subprocess.run(
        [sys.executable, TRAIN_NET, "--config-file", str(child), "--eval-only"],
        cwd=tmp_path,
        env=env_for(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("train_net.py: error:")]
    assert len(err) == 1 and str(tmp_path / "evil_base.yaml") in err[0], proc.stderr[-3000:]
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    "opts, names",
    [
        (["SOLVER.BASE_LR", "abc"], ["SOLVER.BASE_LR", "'abc'", "float"]),
        (["MODEL.NOPE", "1"], ["MODEL.NOPE", "spelling"]),
        (["MODEL", "1"], ["MODEL", "one of its keys"]),
        (["SOLVER.MAX_ITER"], ["SOLVER.MAX_ITER", "pairs"]),
        (
            ["MODEL.RWDET.REBUILD_STAGES", "[conv3]"],
            ["'[conv3]'", "expected a list", "MODEL.RWDET.REBUILD_STAGES \"['a', 'b']\""],
        ),
    ],
)
def test_bad_overrides_are_one_line(opts, names, capsys):
    code, err = train_net(["--config-file", DEMO, "--eval-only", *opts], capsys)
    assert code == 2 and len(err) == 1, err
    assert all(n in err[0] for n in names), err


def test_eval_only_without_weights_is_refused(tmp_path, capsys):
    argv = ["--config-file", DEMO, "--eval-only", "OUTPUT_DIR", str(tmp_path / "out")]
    code, err = train_net(argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert "MODEL.WEIGHTS" in err[0] and "random" in err[0]
    code, err = train_net(argv[:3] + ["--resume"] + argv[3:], capsys)
    assert code == 2 and "holds no checkpoint" in err[0], err


def test_second_run_on_a_locked_output_dir_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    with OutputDirLock(str(out), "detection run"):  # the first run, alive
        code, err = train_net(["--config-file", DEMO, "OUTPUT_DIR", str(out)], capsys)
    assert code == 2 and len(err) == 1, err
    assert f"PID {os.getpid()}" in err[0] and "OUTPUT_DIR" in err[0]
    assert not (out / "config.yaml").exists()  # the running run's files are left alone


@pytest.mark.slow
def test_sigterm_saves_and_resumes_at_the_next_iteration(tmp_path):
    make_coco(tmp_path / "data", n_train=4, n_val=1, size=64)
    cfg, out = tmp_path / "tiny.yaml", tmp_path / "out"
    write_config(cfg, out)
    # No periodic checkpoint and no evaluation: only the stop can have written the checkpoint.
    common = [sys.executable, TRAIN_NET, "--config-file", str(cfg), "DATASETS.TEST", "()"]
    proc = subprocess.Popen(
        common + ["SOLVER.MAX_ITER", "100000", "SOLVER.CHECKPOINT_PERIOD", "100000"],
        cwd=ROOT,
        env=env_for(tmp_path / "data"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "Starting training from iteration 0" in line:
            proc.send_signal(signal.SIGTERM)  # handled after the first step at the earliest
    assert proc.wait(timeout=300) == 143, "".join(lines[-40:])
    log = "".join(lines)
    assert "Traceback" not in log, log[-3000:]
    stop = [x for x in lines if x.startswith("train_net.py: stopped by SIGTERM after iteration")]
    assert len(stop) == 1 and "resume with the same command" in stop[0], log[-3000:]
    it = int(stop[0].split("iteration ")[1].split(";")[0])
    name = f"model_{it:07d}.pth"
    assert (out / "last_checkpoint").read_text() == name
    assert torch.load(out / name, weights_only=True)["iteration"] == it

    proc = subprocess.run(
        common + ["SOLVER.MAX_ITER", str(it + 2)],
        cwd=ROOT,
        env=env_for(tmp_path / "data"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Starting training from iteration {it + 1}" in proc.stdout + proc.stderr
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == it + 1
