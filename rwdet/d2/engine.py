"""Detection training and evaluation: detectron2's ``DefaultTrainer`` with rwdet's pieces.

What differs from detectron2's ``tools/train_net.py``: the config has the ``MODEL.RWDET`` keys,
checkpoints go through ``RwdetCheckpointer`` (safe loading, atomic saving, graphs embedded and
checked), datasets are checked before anything is built, evaluation is the official
pycocotools COCOeval, and a run auto-resumes from the last checkpoint in ``OUTPUT_DIR``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref

import torch
from detectron2.config import get_cfg
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    default_setup,
)
from detectron2.engine import hooks as d2_hooks
from detectron2.evaluation import COCOEvaluator, verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from rwdet.d2.checkpoint import RwdetCheckpointer, resume_checkpoint_file
from rwdet.d2.config import add_rwdet_config
from rwdet.d2.datasets import check_datasets, register_cli_datasets
from rwdet.d2.hooks import StopOnSignal, forwarded_stop, quiet_stop_logging
from rwdet.d2.rescale import check_batch_split, rescaling_note
from rwdet.d2.safe_config import merge_config_file, merge_config_opts
from rwdet.run.errors import UserError
from rwdet.run.lock import OutputDirLock
from rwdet.run.stop import graceful_stop

logger = logging.getLogger(__name__)


class Trainer(DefaultTrainer):
    """DefaultTrainer, built the same way, with two changes to its construction: the
    checkpointer is ``RwdetCheckpointer``, and DDP of a CPU model gets no ``device_ids``
    (detectron2 always passes the local rank, which only works on GPUs), so gloo runs work.
    """

    def __init__(self, cfg, stop_flags=()):
        TrainerBase.__init__(self)
        self._stop_flags = stop_flags
        scaled = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        note = rescaling_note(cfg, scaled)
        if note:
            logger.info(note)
        cfg = scaled
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = cfg.MODEL.DEVICE.startswith("cuda")
        model = create_ddp_model(
            model,
            broadcast_buffers=False,
            device_ids=[comm.get_local_rank()] if on_gpu else None,
        )
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = RwdetCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self), **unverified_graphs(cfg)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        ret = super().build_hooks()
        if self._stop_flags:
            # After the LR scheduler (the saved state is "this step done") and before the
            # periodic checkpoint and evaluation (a stop should not wait for an evaluation).
            late = (d2_hooks.PeriodicCheckpointer, d2_hooks.EvalHook)
            i = next((i for i, h in enumerate(ret) if isinstance(h, late)), len(ret))
            ret.insert(i, StopOnSignal(*self._stop_flags))
        return ret

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        # The official pycocotools COCOeval, as in the paper's tables.
        return COCOEvaluator(
            dataset_name, tasks=("bbox",), output_dir=output_folder, use_fast_impl=False
        )


def load_config(args):
    """Config from file + overrides (safe YAML, one-line errors), with the runtime adjustments
    a CPU-only host needs. Writes nothing: the output folder is not ours before its lock."""
    cfg = get_cfg()
    add_rwdet_config(cfg)
    if args.config_file:
        merge_config_file(cfg, args.config_file)
    merge_config_opts(cfg, list(args.opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("MODEL.DEVICE=%s but CUDA is not available: using cpu", cfg.MODEL.DEVICE)
        cfg.MODEL.DEVICE = "cpu"
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        logger.warning("SOLVER.AMP.ENABLED needs CUDA (detectron2's AMPTrainer): AMP is off")
        cfg.SOLVER.AMP.ENABLED = False
    cfg.freeze()
    return cfg


def finish_setup(cfg, args) -> None:
    """detectron2's setup (writes OUTPUT_DIR/config.yaml and the log) plus rwdet's loggers."""
    default_setup(cfg, args)
    # rwdet's own loggers (graph source, auto-resume, ...) print next to detectron2's.
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="rwdet")


def setup(args):
    cfg = load_config(args)
    finish_setup(cfg, args)
    return cfg


def has_checkpoint(output_dir: str) -> bool:
    return resume_checkpoint_file(output_dir) is not None


def unverified_graphs(cfg) -> dict:
    return {"allow_unverified_graphs": cfg.MODEL.RWDET.ALLOW_UNVERIFIED_GRAPHS}


def check_eval_weights(cfg, args) -> None:
    """``--eval-only`` of a random initialisation is never what was meant: refuse it."""
    if cfg.MODEL.WEIGHTS or (args.resume and has_checkpoint(cfg.OUTPUT_DIR)):
        return
    hint = ""
    if has_checkpoint(cfg.OUTPUT_DIR):
        hint = f", or add --resume to evaluate the last checkpoint in {cfg.OUTPUT_DIR!r}"
    elif args.resume:
        hint = f" (--resume: OUTPUT_DIR {cfg.OUTPUT_DIR!r} holds no checkpoint)"
    raise UserError(
        "--eval-only needs trained weights but MODEL.WEIGHTS is empty, so a random "
        f"initialisation would be evaluated; pass MODEL.WEIGHTS path/to/model_final.pth{hint}"
    )


def output_dir_lock(cfg):
    """One run per OUTPUT_DIR (held by the main process, which alone writes there)."""
    if not cfg.OUTPUT_DIR or not comm.is_main_process():
        return contextlib.nullcontext()
    return OutputDirLock(cfg.OUTPUT_DIR, "detection run", setting="OUTPUT_DIR")


def check_request(args):
    """The checks that need no output folder and no process group: a launcher runs them once
    before spawning workers, so a bad config is one line, not one per worker. Registers the
    ``--dataset`` datasets first: ``main`` calls this in every process, spawned workers too."""
    register_cli_datasets(getattr(args, "dataset", None))
    cfg = load_config(args)
    if args.eval_only:
        check_eval_weights(cfg, args)
    else:
        check_batch_split(cfg, args.num_gpus * args.num_machines)
    return cfg


def main(args):
    cfg = check_request(args)
    with output_dir_lock(cfg):
        finish_setup(cfg, args)
        return _run(cfg, args)


def _run(cfg, args):
    check_datasets(cfg, list(cfg.DATASETS.TEST) if args.eval_only else None)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        RwdetCheckpointer(model, save_dir=cfg.OUTPUT_DIR, **unverified_graphs(cfg)).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            print_summary(cfg, res)
        return res

    quiet_stop_logging()
    with graceful_stop() as stop, forwarded_stop() as forwarded:
        trainer = Trainer(cfg, stop_flags=(stop, forwarded))
        resume = args.resume or (not args.no_auto_resume and has_checkpoint(cfg.OUTPUT_DIR))
        if resume and not args.resume:
            logger.info("auto-resuming from the last checkpoint in %s", cfg.OUTPUT_DIR)
        trainer.checkpointer.remove_stale_temp_files()  # under the lock, before any save
        trainer.resume_or_load(resume=resume)
        trainer.train()
    res = getattr(trainer, "_last_eval_results", None)
    if res and comm.is_main_process():
        print_summary(cfg, res)
    return res


def print_summary(cfg, res) -> None:
    """One plain line per test set: the numbers a reader looks for first."""
    per_set = res if len(cfg.DATASETS.TEST) > 1 else {cfg.DATASETS.TEST[0]: res}
    for name, r in per_set.items():
        bbox = r.get("bbox", {})
        if bbox:
            print(
                f"[rwdet] {name} bbox: AP {bbox['AP']:.2f}  AP50 {bbox['AP50']:.2f}  "
                f"AP75 {bbox['AP75']:.2f}  APs {bbox['APs']:.2f}  APm {bbox['APm']:.2f}  "
                f"APl {bbox['APl']:.2f}",
                flush=True,
            )
