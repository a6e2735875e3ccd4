"""A training run's context, set up from its config: data, model (fresh, resumed or
fine-tuned), optimizer, schedule, AMP, EMA, the training state and the loaders.

``setup_run`` validates everything before the run writes anything to its output folder (a run
that dies on a bad value leaves the folder as it was); ``classification.trainer`` then only
runs the loop over the ``Run`` it returns.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from classification import builders
from classification import checkpoint as ckpt_lib
from classification.config import to_dict, to_yaml
from classification.data import build_datasets
from classification.distributed import (
    DistInfo,
    check_same_data_on_all_ranks,
    check_same_on_all_ranks,
)
from classification.divergence import DivergenceGuard
from classification.ema import ModelEMA
from classification.logger import LOG_NAME, MetricWriter
from classification.sampler import TrainSampler, subset_indices
from rwdet.atomic import atomic_write
from rwdet.graphs import graphs_fingerprint
from rwdet.models import get_graphs
from rwdet.run import allocator

log = logging.getLogger(LOG_NAME)


@dataclass
class Run:
    """What the loop needs besides the model: the config (``config`` as plain dicts, for
    checkpoints), the processes, the checkpointed state, the metric writer, the autocast dtype
    (None: float32), the graceful-stop flag, the data and the sampler of the training images."""

    cfg: dict
    config: dict
    d: DistInfo
    state: ckpt_lib.TrainState
    writer: MetricWriter
    amp_dtype: torch.dtype | None
    stop: object | None
    train_set: object
    indices: list
    sampler: TrainSampler
    batch: int  # per process
    start_iter: int

    @property
    def epochs(self) -> int:
        return self.cfg["schedule"]["epochs"]

    @property
    def total_iters(self) -> int:
        return self.epochs * self.state.iters_per_epoch


def setup_run(cfg: dict, d: DistInfo, writer: MetricWriter, stop=None):
    """(run, model ready to train (DDP/compiled), train loader, val loader)."""
    out, tc = cfg["output_dir"], cfg["train"]
    log.info(
        "output dir: %s (%d process%s, %s, memory allocator %s)",
        out, d.world, "es" * (d.world > 1), d.device, allocator.describe(),
    )  # fmt: skip
    builders.seed_all(cfg["seed"])
    train_set, val_set, classes, in_ch = build_datasets(cfg, train=True)
    log.info("%s", builders.describe_data(cfg, train_set, val_set, classes))
    check_same_data_on_all_ranks(classes, {"train": len(train_set), "val": len(val_set)})

    if d.is_main:  # only rank 0 saves, and it has not saved yet
        for f in ckpt_lib.remove_stale_temp_files(out):
            log.info("removed %s, left by a save that was killed", f)
    path = builders.resume_path(cfg)
    ckpt = ckpt_lib.load_checkpoint(path) if path else None
    spec = builders.model_spec(cfg, len(classes), in_ch)
    model = builders.model_for_run(cfg, spec, classes, path, ckpt)
    fingerprint = graphs_fingerprint(get_graphs(model))
    check_same_on_all_ranks(fingerprint, "graph fingerprint")
    log.info(
        "model %s %s, graph seed %s, graph fingerprint %s",
        spec["name"], spec["kwargs"], cfg["model"]["seed"], fingerprint,
    )  # fmt: skip
    # Measured on the CPU model; written with config.yaml once everything is validated.
    complexity = (
        builders.log_complexity(model, cfg, in_ch) if d.is_main and tc["complexity"] else None
    )

    model = builders.prepare_model(model, cfg, d)
    batch = builders.per_rank(tc["batch_size"], d, "train.batch_size")
    optimizer = builders.build_optimizer(model, cfg)
    indices = subset_indices(len(train_set), cfg["data"]["train_subset"], cfg["seed"])
    sampler = TrainSampler(indices, batch, cfg["seed"], d.rank, d.world)
    ipe = sampler.batches_per_epoch
    if ipe < 1:
        raise ValueError(
            f"the training set ({len(indices)} images) is smaller than one batch per process "
            f"({batch}); lower --batch-size"
        )
    scheduler = builders.build_scheduler(cfg, optimizer, ipe, tc["batch_size"])
    amp_dtype, use_scaler = builders.amp_settings(cfg, d)
    state = ckpt_lib.TrainState(
        optimizer=optimizer, scheduler=scheduler,
        scaler=torch.amp.GradScaler(d.device.type, enabled=use_scaler),
        ema=ModelEMA(model, tc["ema_decay"]) if tc["ema"] else None, guard=DivergenceGuard(tc),
        iters_per_epoch=ipe, classes=classes, last_path=os.path.join(out, ckpt_lib.LAST),
    )  # fmt: skip

    # Per-rank stream for dropout and edge drop (the init above was identical on all ranks).
    builders.seed_all(cfg["seed"] + 1_000_003 * (d.rank + 1))
    if ckpt is not None:
        resume(state, ckpt, model, d, path)
    # Each rank looks for last.pth itself; one that started fresh (e.g. a node-local output
    # folder) next to ranks that resumed would drift apart silently, then hang.
    check_same_on_all_ranks(
        f"iteration {state.iteration}",
        "resume point",
        "every rank must see the same last.pth: use an output folder shared by all nodes "
        "(--output-dir), or --resume PATH on each",
    )
    model = builders.wrap_model(model, cfg, d)
    train_loader = builders.train_loader_for(train_set, sampler, batch, cfg, d)
    val_loader = builders.eval_loader(val_set, cfg, d)
    run = Run(
        cfg, to_dict(cfg), d, state, writer, amp_dtype, stop, train_set, indices, sampler,
        batch, state.iteration,
    )  # fmt: skip
    if d.is_main:  # everything above validated: only now does this run write to the folder
        start_run_files(run, path, complexity)
    return run, model, train_loader, val_loader


def resume(state: ckpt_lib.TrainState, ckpt: dict, model: nn.Module, d: DistInfo, path: str):
    if not state.restore(ckpt, model, d.rank, d.world):
        old = ckpt.get("sampler") or {}
        log.warning(
            "the checkpoint was written with %s iterations/epoch on %s processes (now %d on %d): "
            "continuing from the start of its epoch (iteration %d), not bit-exactly",
            old.get("iters_per_epoch"), old.get("world"), state.iters_per_epoch, d.world,
            state.iteration,
        )  # fmt: skip
    log.info(
        "resumed from %s at epoch %d, iteration %d",
        path, state.iteration // state.iters_per_epoch, state.iteration,
    )  # fmt: skip


def start_run_files(run: Run, path: str | None, complexity: dict | None) -> None:
    """Set aside the checkpoints of a run this one does not continue (a new run must never
    replace a good best.pth or last.pth), then write config.yaml and the complexity record."""
    out = run.cfg["output_dir"]
    own_last = os.path.join(out, ckpt_lib.LAST)
    continues = path is not None and os.path.realpath(path) == os.path.realpath(own_last)
    if not continues and any(os.path.isfile(os.path.join(out, n)) for n in ckpt_lib.CHECKPOINTS):
        run.writer.close()  # metrics.jsonl and tb/ move too; reopened fresh below
        moved = ckpt_lib.move_previous_run(out)
        run.writer.open()
        if moved:
            run.state.moved_to = moved[0]
            log.warning(
                "not continuing the run in %s: moved its %s to %s",
                out, ", ".join(moved[1]), moved[0],
            )  # fmt: skip
    atomic_write(os.path.join(out, "config.yaml"), lambda f: f.write(to_yaml(run.cfg)), mode="w")
    if complexity is not None:
        run.writer.write("model", 0, complexity)
