"""Detection behaviour users rely on without reading detectron2: REFERENCE_WORLD_SIZE rescaling
(``DefaultTrainer.auto_scale_workers``), the line that states it, and the one-line refusal of a
batch that cannot be rescaled or split (issue #14)."""

from argparse import Namespace
from pathlib import Path

import pytest
from detectron2.engine import DefaultTrainer
from test_adversarial_d2_cli import load_tool

import rwdet.d2  # noqa: F401
from rwdet.d2.engine import load_config
from rwdet.d2.rescale import rescaling_note
from rwdet.run.errors import run_cli

C109 = str(Path(__file__).resolve().parents[1] / "configs" / "frcnn_randwire_c109.yaml")


def c109(*opts):
    return load_config(Namespace(config_file=C109, opts=["MODEL.DEVICE", "cpu", *opts]))


# detectron2's rule for a config written for 8 workers (16 images, LR 0.02, 90k iterations):
# 2 images per worker kept, the LR linear in the batch, every iteration count inverse to it.
@pytest.mark.parametrize(
    "workers, batch, lr, factor",
    [(1, 2, 0.0025, 8), (2, 4, 0.005, 4)],
)
def test_reference_world_size_rescaling_and_its_log_line(workers, batch, lr, factor):
    cfg = c109()
    assert cfg.SOLVER.REFERENCE_WORLD_SIZE == 8 and cfg.SOLVER.IMS_PER_BATCH == 16
    scaled = DefaultTrainer.auto_scale_workers(cfg, workers)
    s = scaled.SOLVER
    assert (s.IMS_PER_BATCH, s.REFERENCE_WORLD_SIZE) == (batch, workers)
    assert s.BASE_LR == pytest.approx(lr, rel=1e-12)
    assert s.MAX_ITER == 90000 * factor and tuple(s.STEPS) == (60000 * factor, 80000 * factor)
    assert (s.WARMUP_ITERS, s.CHECKPOINT_PERIOD) == (500 * factor, 5000 * factor)

    note = rescaling_note(cfg, scaled)
    assert "\n" not in note
    for part in (
        f"SOLVER.REFERENCE_WORLD_SIZE 8 rescaled to {workers} worker",
        f"SOLVER.IMS_PER_BATCH 16 -> {batch}",
        f"SOLVER.BASE_LR 0.02 -> {lr:g}",
        f"SOLVER.MAX_ITER 90000 -> {90000 * factor}",
        f"SOLVER.STEPS (60000, 80000) -> ({60000 * factor}, {80000 * factor})",
        f"SOLVER.WARMUP_ITERS 500 -> {500 * factor}",
        f"SOLVER.CHECKPOINT_PERIOD 5000 -> {5000 * factor}",
        "SOLVER.REFERENCE_WORLD_SIZE 0",  # how to turn it off
    ):
        assert part in note, (part, note)


def test_no_log_line_without_rescaling():
    cfg = c109()
    assert rescaling_note(cfg, DefaultTrainer.auto_scale_workers(cfg, 8)) is None
    off = c109("SOLVER.REFERENCE_WORLD_SIZE", "0")
    assert rescaling_note(off, DefaultTrainer.auto_scale_workers(off, 1)) is None


@pytest.mark.parametrize(
    "gpus, opts, says",
    [
        # The case: the everyday debug override on the base config, on 1 and 2 GPUs.
        (
            1,
            ["SOLVER.IMS_PER_BATCH", "2"],
            [
                "SOLVER.IMS_PER_BATCH 2 is not a multiple of SOLVER.REFERENCE_WORLD_SIZE 8",
                "SOLVER.REFERENCE_WORLD_SIZE 0 to train with the values as written "
                "(batch 2, BASE_LR 0.02, MAX_ITER 90000)",
                "SOLVER.IMS_PER_BATCH 16 (the batch for 8 workers), which rescales to "
                "batch 2, BASE_LR 0.0025, MAX_ITER 720000",
            ],
        ),
        (
            2,
            ["SOLVER.IMS_PER_BATCH", "2"],
            ["to 2 workers", "SOLVER.IMS_PER_BATCH 8", "batch 2, BASE_LR 0.005, MAX_ITER 360000"],
        ),
        (
            2,
            ["SOLVER.REFERENCE_WORLD_SIZE", "0", "SOLVER.IMS_PER_BATCH", "3"],
            ["SOLVER.IMS_PER_BATCH 3 does not split evenly over 2 workers", "IMS_PER_BATCH 4"],
        ),
        (
            2,
            ["SOLVER.REFERENCE_WORLD_SIZE", "1", "SOLVER.IMS_PER_BATCH", "1"]
            + ["SOLVER.CHECKPOINT_PERIOD", "1"],
            ["SOLVER.CHECKPOINT_PERIOD 1 becomes 0", "SOLVER.CHECKPOINT_PERIOD 2 or more"],
        ),
    ],
)
def test_batch_that_cannot_be_rescaled_is_one_line_before_any_worker(
    gpus, opts, says, tmp_path, capsys, monkeypatch
):
    def no_launch(*a, **k):
        raise AssertionError("workers launched for a config that cannot run")

    tool = load_tool()
    monkeypatch.setattr(tool, "launch", no_launch)
    out = tmp_path / "out"
    argv = ["--config-file", C109, "--num-gpus", str(gpus), "MODEL.DEVICE", "cpu"]
    code = run_cli(tool.cli, "train_net.py", [*argv, "OUTPUT_DIR", str(out), *opts])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("train_net.py: error: ")
    for part in says:
        assert part in err[0], (part, err[0])
    assert not out.exists()  # refused before the output folder was touched
