"""Flat training and evaluation functions (pycls style): build, train_epoch, evaluate, main.

One call of ``main(cfg)`` is one run: single process, or one rank of a torchrun job. Only
rank 0 writes logs and checkpoints; every rank builds the model from the same config (or the
same checkpoint edge lists) and the graph fingerprints are compared before training starts.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from classification import checkpoint as ckpt_lib
from classification.config import to_yaml
from classification.data import (
    ImageFolderDataset,
    build_datasets,
    collate_skip_bad,
    no_readable_images,
    worker_init,
)
from classification.distributed import (
    DistInfo,
    agree_on_stop,
    all_gather_object,
    all_reduce_sum,
    check_same_data_on_all_ranks,
    check_same_on_all_ranks,
    cleanup,
    init_distributed,
    output_dir_lock,
)
from classification.divergence import DivergenceGuard
from classification.ema import ModelEMA
from classification.logger import (
    FILE_LOG_NAME,
    LOG_NAME,
    MetricWriter,
    progress,
    setup_logging,
    use_progress_bar,
)
from classification.metrics import peak_memory_mb, topk_hits
from classification.precise_bn import recompute_bn_stats
from classification.sampler import EvalSampler, TrainSampler, subset_indices
from classification.schedule import CosineWarmup, MultiStepWarmup, scaled_lr
from rwdet.atomic import atomic_write
from rwdet.checkpoint_io import model_record
from rwdet.graphs import graphs_fingerprint
from rwdet.models import build_model, get_graphs, model_capabilities
from rwdet.models.artifact import ModelFile, load_weights, read_model_file
from rwdet.models.verify import verify_graphs
from rwdet.run import allocator
from rwdet.run.errors import UserError
from rwdet.run.stop import StopRequested, graceful_stop

log = logging.getLogger(LOG_NAME)
file_log = logging.getLogger(FILE_LOG_NAME)  # log.txt only (while a tqdm bar is shown)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- building


def model_spec(cfg: dict, num_classes: int, in_channels: int) -> dict:
    """The ``build_model`` name and keyword arguments a config asks for (JSON values only)."""
    m = cfg["model"]
    kwargs = dict(m["kwargs"])
    for key in ("gen", "seed", "wiring", "nodes", "channels", "node_op"):
        if m[key] is not None:
            kwargs[key] = m[key]
    if m["gen_params"]:
        kwargs["gen_params"] = dict(m["gen_params"])
    kwargs["num_classes"] = num_classes
    if in_channels != 3:
        kwargs["in_channels"] = in_channels
    size_key = model_capabilities(m["name"]).input_size
    if size_key and size_key not in kwargs:  # e.g. Conv2-Conv8's FC is sized for the input
        if cfg["data"]["train_size"] != cfg["data"]["test_size"]:
            raise UserError(
                f"model {m['name']!r} is built for one input size, but data.train_size="
                f"{cfg['data']['train_size']} and data.test_size={cfg['data']['test_size']} "
                "differ; set both to the same size"
            )
        kwargs[size_key] = cfg["data"]["train_size"]
    return {"name": m["name"], "kwargs": kwargs}


def build(spec: dict, graphs: dict | None = None) -> nn.Module:
    """``build_model`` from a spec; stage graphs (edge lists) are passed only when there are any."""
    kwargs = dict(spec["kwargs"])
    if graphs:
        kwargs["graphs"] = graphs
    try:
        return build_model(spec["name"], **kwargs)
    except TypeError as e:
        raise ValueError(
            f"model {spec['name']!r} cannot be built with the keywords {sorted(spec['kwargs'])}: "
            f"{e}. Drop the flags/config keys this model does not take (e.g. --gen/--seed for "
            f"models without random graphs)"
        ) from None


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def describe_data(cfg: dict, train_set, val_set, classes) -> str:
    data = cfg["data"]
    n_train = len(train_set) if train_set is not None else 0
    if data["name"] == "fashion_mnist":
        why = (
            "no --data given, so the embedded default is used: real product photos from the "
            "Debian package dataset-fashion-mnist, small enough to train in minutes on a CPU; "
            "pass --data ROOT for a folder in ImageNet layout"
        )
        return (
            f"data: Fashion-MNIST from {data['fashion_mnist_dir']} ({n_train} train / "
            f"{len(val_set)} test images, {len(classes)} classes, 28x28 grayscale, "
            f"train/test size {data['train_size']}/{data['test_size']}) -- {why}"
        )
    if data["name"] in ("cifar10", "cifar100"):
        return (
            f"data: {data['name']} batches under {data['root']} ({n_train} train / "
            f"{len(val_set)} test images, {len(classes)} classes; train random crop "
            f"{data['train_size']} pad 4 + flip, test size {data['test_size']})"
        )
    resize = data["test_resize"] or round(data["test_size"] / 0.875)
    return (
        f"data: ImageNet layout at {data['root']} ({n_train} train / {len(val_set)} val "
        f"images, {len(classes)} classes; train RandomResizedCrop {data['train_size']} + flip, "
        f"val resize {resize} + center crop {data['test_size']})"
    )


def log_complexity(model: nn.Module, cfg: dict, in_channels: int) -> dict | None:
    """Log params and FLOPs; the record for metrics.jsonl is returned, written once the run
    has passed validation (a run that dies on a bad value writes nothing)."""
    size = cfg["data"]["test_size"]
    try:
        with warnings.catch_warnings():  # fvcore uses the deprecated torch.jit API
            warnings.simplefilter("ignore", FutureWarning)
            from rwdet.complexity import complexity

            c = complexity(model, size, in_channels)
    except Exception as e:  # noqa: BLE001 - a tracing problem must not stop training
        log.warning("complexity: fvcore could not count this model (%s)", e)
        return None
    log.info(
        "model %s: %.3fM params, %.1fM FLOPs (multiply-adds) at %dx%d",
        cfg["model"]["name"],
        c["params"] / 1e6,
        c["flops"] / 1e6,
        size,
        size,
    )
    return {k: c[k] for k in ("params", "flops", "activations", "input_size")}


def prepare_model(model: nn.Module, cfg: dict, d: DistInfo) -> nn.Module:
    """Move to the device, set the memory format, optionally convert to SyncBatchNorm."""
    if cfg["train"]["sync_bn"] and d.distributed:
        if d.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            log.warning("train.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); ignored")
    model = model.to(d.device)
    if cfg["train"]["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    return model


def amp_settings(cfg: dict, d: DistInfo):
    """(autocast dtype or None, use a GradScaler). AMP runs on CUDA only; on CPU it is off."""
    amp = cfg["train"]["amp"]
    if amp == "off":
        return None, False
    if d.device.type != "cuda":
        log.warning("train.amp=%s needs CUDA; training in float32 on %s", amp, d.device.type)
        return None, False
    return AMP_DTYPES[amp], amp == "fp16"


def autocast(d: DistInfo, dtype):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=d.device.type, dtype=dtype)


def make_loader(
    dataset, sampler, batch_size, cfg, d: DistInfo, seed: int, persistent=True, collate=None
):
    workers = cfg["data"]["workers"]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg["data"]["pin_memory"] and d.device.type == "cuda",
        drop_last=False,
        collate_fn=collate or collate_skip_bad,
        worker_init_fn=worker_init,
        persistent_workers=persistent and workers > 0,
        # A private generator: creating an iterator must not draw from the global RNG, or a
        # resumed run would see a different dropout/edge-drop stream than an uninterrupted one.
        generator=torch.Generator().manual_seed(seed),
    )


def train_loader_for(train_set, sampler, batch, cfg, d: DistInfo):
    """The CPU-decoding loader, or with ``data.gpu_decode`` one that decodes on the device."""
    if not cfg["data"]["gpu_decode"]:
        return make_loader(train_set, sampler, batch, cfg, d, cfg["seed"])
    from classification.gpu_decode import (
        DecodingLoader,
        EncodedImageDataset,
        GpuDecoder,
        collate_encoded,
    )

    if not isinstance(train_set, ImageFolderDataset):
        raise ValueError("data.gpu_decode needs JPEG files in ImageNet layout (--data ROOT)")
    if d.device.type != "cuda":
        log.warning("data.gpu_decode without CUDA: decoding on the CPU in the main process")
    encoded = EncodedImageDataset(train_set.samples, train_set.classes)
    loader = make_loader(encoded, sampler, batch, cfg, d, cfg["seed"], collate=collate_encoded)
    return DecodingLoader(loader, GpuDecoder(cfg["data"]["train_size"], True, d.device))


def per_rank(global_batch: int, d: DistInfo, what: str) -> int:
    if global_batch % d.world:
        raise ValueError(
            f"{what}={global_batch} does not divide by the {d.world} processes; pick a multiple "
            f"of {d.world}"
        )
    return global_batch // d.world


_REPORTED: set = set()  # unreadable files already logged in this process (each is logged once)


def report_bad(bad: list, counter: dict) -> None:
    for path, reason in bad:
        counter["skipped"] += 1
        if path not in _REPORTED:
            _REPORTED.add(path)
            log.warning("skipped unreadable image %s (%s)", path, reason)


def precise_bn(model, train_set, indices, epoch: int, cfg: dict, d: DistInfo, batch: int):
    """Recompute BN statistics on ``train.precise_bn`` training images (fixed per epoch)."""
    sampler = TrainSampler(indices, batch, cfg["seed"] + 1, d.rank, d.world)
    sampler.set_epoch(epoch)
    n_batches = max(1, -(-cfg["train"]["precise_bn"] // (batch * d.world)))
    loader = make_loader(train_set, sampler, batch, cfg, d, cfg["seed"], persistent=False)

    def batches():
        for i, (images, _, _) in enumerate(loader):
            if i >= n_batches:
                break
            if images is not None:
                images = images.to(d.device, non_blocking=True)
                if cfg["train"]["channels_last"]:
                    images = images.contiguous(memory_format=torch.channels_last)
                yield images

    n = recompute_bn_stats(ckpt_lib.unwrap(model), batches(), d.world)
    log.info("precise BN: statistics recomputed on %d batches of %d images", n, batch)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, loader, d: DistInfo, cfg: dict, desc: str = "eval") -> dict:
    """Top-1/top-5 over the whole split, each image counted once across all ranks."""
    amp_dtype = AMP_DTYPES.get(cfg["train"]["amp"]) if d.device.type == "cuda" else None
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=d.device)  # loss, top1, top5, n, skipped
    counter = {"skipped": 0}
    bar = progress(loader, len(loader), desc, d.is_main and use_progress_bar())
    for images, targets, bad in bar:
        report_bad(bad, counter)
        if images is None:
            continue
        images = images.to(d.device, non_blocking=True)
        targets = targets.to(d.device, non_blocking=True)
        if cfg["train"]["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(d, amp_dtype):
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, targets, reduction="sum").double()
        sums[1:3] += topk_hits(logits, targets)
        sums[3] += len(targets)
    sums[4] += counter["skipped"]
    all_reduce_sum(sums)
    model.train(was_training)
    if sums[3].item() == 0:  # summed over ranks: every rank raises together
        raise no_readable_images(cfg, "val", int(sums[4].item()))
    n = max(sums[3].item(), 1.0)
    return {
        "top1": 100.0 * sums[1].item() / n,
        "top5": 100.0 * sums[2].item() / n,
        "loss": sums[0].item() / n,
        "count": int(sums[3].item()),
        "skipped": int(sums[4].item()),
    }


def eval_loader(val_set, cfg: dict, d: DistInfo):
    bs = per_rank(cfg["eval"]["batch_size"], d, "eval.batch_size")
    return make_loader(val_set, EvalSampler(len(val_set), d.rank, d.world), bs, cfg, d, 0)


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(paths, model, state: dict, cfg: dict, d: DistInfo) -> None:
    """Collective (every rank sends its RNG state); rank 0 writes each path atomically.

    Every rank runs the divergence guard first (on the same numbers), so a diverged state is
    never written and all ranks stop together."""
    state["guard"].check_before_save(model, state["iteration"] - 1, kept_checkpoint(state))
    rng = all_gather_object(ckpt_lib.rng_state())
    if not d.is_main:
        return
    plain = ckpt_lib.unwrap(model)
    ema = state["ema"]
    obj = {
        **model_record(plain),
        "ema": ema.state_dict() if ema is not None else None,
        "ema_updates": ema.updates if ema is not None else 0,
        "optimizer": state["optimizer"].state_dict(),
        "scheduler": state["scheduler"].state_dict(),
        "scaler": state["scaler"].state_dict() if state["scaler"].is_enabled() else None,
        "epoch": state["iteration"] // state["iters_per_epoch"],
        "iteration": state["iteration"],
        "rng": rng,
        "sampler": {  # the data order is a function of (seed, epoch); position = start_batch
            "seed": cfg["seed"],
            "epoch": state["iteration"] // state["iters_per_epoch"],
            "start_batch": state["iteration"] % state["iters_per_epoch"],
            "iters_per_epoch": state["iters_per_epoch"],
            "world": d.world,
        },
        "config": cfg,
        "metrics": dict(state["metrics"]),
        "classes": list(state["classes"]),
        "skipped_train": state["skipped_train"],
        "guard": state["guard"].state_dict(),
    }
    for path in paths:
        ckpt_lib.atomic_save(obj, path)
    state["saved_iteration"] = state["iteration"]


def resume_path(cfg: dict) -> str | None:
    resume = cfg["train"]["resume"]
    if resume is True:
        return ckpt_lib.latest_checkpoint(cfg["output_dir"])
    if not resume:  # the folder's checkpoints are moved aside later (start_run_files)
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint")
    return resume


# ---------------------------------------------------------------------------- training


def train_epoch(model, loader, epoch: int, start_batch: int, state: dict, cfg: dict, d):
    """One epoch from batch ``start_batch``; returns the epoch's mean train loss."""
    ipe, epochs = state["iters_per_epoch"], cfg["schedule"]["epochs"]
    opt, sched, scaler, ema = state["optimizer"], state["scheduler"], state["scaler"], state["ema"]
    amp_dtype, _ = state["amp"]
    writer: MetricWriter = state["writer"]
    tc, log_period = cfg["train"], cfg["train"]["log_period"]
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["optim"]["label_smoothing"])
    # Window sums on the device (no host sync per step): loss, top1, top5, n, nonfinite,
    # unreadable images skipped (summed over ranks with the rest).
    window = torch.zeros(6, dtype=torch.float64, device=d.device)
    epoch_loss = torch.zeros(2, dtype=torch.float64, device=d.device)
    counter = {"skipped": 0}
    counted, skipped_epoch = 0, 0
    bar_on = d.is_main and use_progress_bar()
    bar = progress(loader, len(loader), f"epoch {epoch + 1}/{epochs}", bar_on)
    t_last = time.perf_counter()
    t_window, data_time, steps_in_window = t_last, 0.0, 0
    model.train()
    for b, (images, targets, bad) in enumerate(bar, start=start_batch):
        data_time += time.perf_counter() - t_last
        it = epoch * ipe + b
        lr = sched.step(it)
        report_bad(bad, counter)
        if images is None:
            if d.distributed:
                raise UserError(
                    f"every image of batch {b} on rank {d.rank} was unreadable; the ranks "
                    f"cannot stay in step. Remove the unreadable files listed above"
                )
            state["iteration"] = it + 1
            t_last = time.perf_counter()
            continue
        images = images.to(d.device, non_blocking=True)
        targets = targets.to(d.device, non_blocking=True)
        if tc["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(d, amp_dtype):
            logits = model(images)
            loss = criterion(logits.float(), targets)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg["optim"]["clip_grad"]:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(
                (p for p in model.parameters() if p.requires_grad), cfg["optim"]["clip_grad"]
            )
        scaler.step(opt)
        scaler.update()
        if ema is not None:
            ema.update(ckpt_lib.unwrap(model))
        with torch.no_grad():
            n = len(targets)
            window[0] += loss.detach().double() * n
            window[1:3] += topk_hits(logits.detach(), targets)
            window[3] += n
            window[4] += (~torch.isfinite(loss.detach())).double()
        state["iteration"] = it + 1
        steps_in_window += 1
        last_of_epoch = b + 1 == ipe
        if (it + 1) % log_period == 0 or last_of_epoch:
            window[5] += counter["skipped"] - counted
            counted = counter["skipped"]
            stats = all_reduce_sum(window.clone())
            skipped_epoch += int(stats[5].item())
            # All ranks' skips, checkpointed with the rest (up to the last logged window).
            state["skipped_train"] += int(stats[5].item())
            check_finite(stats[4].item(), state, it)
            epoch_loss[0] += stats[0]
            epoch_loss[1] += stats[3]
            elapsed = time.perf_counter() - t_window
            values = {
                "epoch": epoch + (b + 1) / ipe,
                "loss": stats[0].item() / max(stats[3].item(), 1),
                "top1": 100 * stats[1].item() / max(stats[3].item(), 1),
                "top5": 100 * stats[2].item() / max(stats[3].item(), 1),
                "lr": lr,
                "img_per_s": stats[3].item() / max(elapsed, 1e-9),
                "data_time_ms": 1000 * data_time / max(steps_in_window, 1),
                "peak_mem_mb": peak_memory_mb(d.device),
                "skipped_images": skipped_epoch,
            }
            writer.write("train", it + 1, values)
            if bar_on:
                bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.4f}")
            if d.is_main:
                eta = (state["total_iters"] - it - 1) * elapsed / max(steps_in_window, 1)
                (file_log if bar_on else log).info(
                    "epoch %d/%d iter %d/%d  loss %.4f  top1 %.2f  top5 %.2f  lr %.5f  "
                    "%.0f img/s  data %.1f ms  mem %.0f MB  eta %s",
                    epoch + 1, epochs, b + 1, ipe, values["loss"], values["top1"],
                    values["top5"], lr, values["img_per_s"], values["data_time_ms"],
                    values["peak_mem_mb"], _fmt_time(eta),
                )  # fmt: skip
            # After the window is logged (so the spike is on record), before any save.
            state["guard"].check_loss(values["loss"], it, kept_checkpoint(state))
            check_weights_finite(model, state, it)
            window.zero_()
            t_window, data_time, steps_in_window = time.perf_counter(), 0.0, 0
        period = tc["checkpoint_period"]
        if period and (it + 1) % period == 0 and not last_of_epoch:
            # The window is checked first so that no checkpoint ever holds diverged weights.
            check_finite(all_reduce_sum(window[4:5].clone()).item(), state, it)
            check_weights_finite(model, state, it)
            save_checkpoint([state["last_path"]], model, state, cfg, d)
        # Every rank votes after every step, so all stop after the same one. The last step of
        # an epoch is left to the epoch's evaluation and save (the epoch loop stops after it).
        if state.get("stop") is not None and not last_of_epoch:
            signame = agree_on_stop(state["stop"].signame, d)
            if signame:
                save_and_stop(signame, model, state, cfg, d, window[4:5])
        t_last = time.perf_counter()
    # Skips after the last flushed window (a final batch with no readable image is skipped
    # before the flush); every rank runs the same number of batches, so all reach this.
    # With the images trained on since then (window[3], flushed only after a trained batch).
    rest = torch.tensor([float(counter["skipped"] - counted), 0.0], device=d.device).double()
    rest[1] = window[3]
    rest = all_reduce_sum(rest)
    skipped_epoch += int(rest[0].item())
    state["skipped_train"] += int(rest[0].item())
    if start_batch == 0 and epoch_loss[1].item() + rest[1].item() == 0:
        # Before the epoch's checkpoint: no step was taken, so there is nothing to save.
        raise no_readable_images(cfg, "train", skipped_epoch, f" in epoch {epoch + 1}")
    if skipped_epoch and d.is_main:
        log.warning("epoch %d: skipped %d unreadable training images", epoch + 1, skipped_epoch)
    return epoch_loss[0].item() / max(epoch_loss[1].item(), 1)


def save_and_stop(signame: str, model, state: dict, cfg: dict, d, nonfinite=None) -> None:
    """Write last.pth after the step just done (the guards of a periodic save apply, so a
    stop never writes diverged weights) and raise StopRequested: the same command resumes at
    the next iteration. ``nonfinite``: the unflushed window's count of non-finite losses;
    None when the state was already saved (at the end of an epoch)."""
    it = state["iteration"] - 1
    if nonfinite is not None:
        check_finite(all_reduce_sum(nonfinite.clone()).item(), state, it)
        check_weights_finite(model, state, it)
        save_checkpoint([state["last_path"]], model, state, cfg, d)
    if d.is_main:
        log.warning("stopped by %s at iteration %d; resume with the same command", signame, it + 1)
    raise StopRequested(signame, f"iteration {it + 1}")


def check_weights_finite(model: nn.Module, state: dict, it: int) -> None:
    """The loss of a step is computed before its update, so a diverging update shows up in the
    weights first: NaN/Inf or beyond train.divergence_max_weight stop the run."""
    state["guard"].check_weights(model, it, kept_checkpoint(state))


def check_finite(nonfinite: float, state: dict, it: int) -> None:
    """``nonfinite``: how many steps (over all ranks) had a NaN/Inf loss."""
    if nonfinite > 0:
        guard = state["guard"]
        raise guard.error(
            it, f"the training loss became NaN/Inf ({guard.level_text()})",
            kept_checkpoint(state),
        )  # fmt: skip


def kept_checkpoint(state: dict) -> str:
    """What a diverged run leaves behind, for its error message."""
    path = state["last_path"]
    if state.get("saved_iteration") is not None:
        return f"The last good checkpoint is kept: {path} (iteration {state['saved_iteration']})"
    if os.path.isfile(path):
        return f"The last good checkpoint is kept: {path}, untouched by this run"
    if state.get("moved_to"):
        return f"This run saved nothing; the previous run's checkpoints are in {state['moved_to']}"
    return "No checkpoint was written yet"


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train(cfg: dict, d: DistInfo) -> dict:
    out = cfg["output_dir"]
    # SIGTERM (a scheduler's warning before it kills the job) and SIGINT only set a flag: the
    # run finishes its step, saves last.pth and raises StopRequested (see train_epoch).
    with graceful_stop() as stop:
        setup_logging(out, d.is_main)
        writer = MetricWriter(out, d.is_main)
        try:
            return _train(cfg, d, writer, stop)
        finally:
            writer.close()


def _train(cfg: dict, d: DistInfo, writer: MetricWriter, stop=None) -> dict:
    out, tc = cfg["output_dir"], cfg["train"]
    log.info(
        "output dir: %s (%d process%s, %s, memory allocator %s)",
        out, d.world, "es" * (d.world > 1), d.device, allocator.describe(),
    )  # fmt: skip
    seed_all(cfg["seed"])
    train_set, val_set, classes, in_ch = build_datasets(cfg, train=True)
    log.info("%s", describe_data(cfg, train_set, val_set, classes))
    check_same_data_on_all_ranks(classes, {"train": len(train_set), "val": len(val_set)})

    if d.is_main:  # only rank 0 saves, and it has not saved yet
        for f in ckpt_lib.remove_stale_temp_files(out):
            log.info("removed %s, left by a save that was killed", f)
    path = resume_path(cfg)
    ckpt = ckpt_lib.load_checkpoint(path) if path else None
    spec = model_spec(cfg, len(classes), in_ch)
    graphs = None
    if ckpt is not None:
        ckpt_lib.check_model_spec(ckpt, spec, path)
        if ckpt.get("classes") and list(ckpt["classes"]) != list(classes):
            raise ckpt_lib.CheckpointMismatchError(
                f"checkpoint {path!r} was trained on other classes ({len(ckpt['classes'])}: "
                f"{ckpt['classes'][:3]}...) than this data ({len(classes)}: {classes[:3]}...)"
            )
        # Restored as edge lists, never regenerated; refused if edited after they were saved.
        graphs = verify_graphs(ckpt["graphs"], ckpt.get("graphs_fingerprint"), path, spec)
    init = None
    if cfg["weights"]:
        if ckpt is not None:  # the run already started from them: its own state wins
            log.info(
                "resuming %s: --weights %s was this run's starting point", path, cfg["weights"]
            )
        else:
            init = read_model_file(cfg["weights"])  # also a Detectron2 file's backbone
            where = cfg["weights"]
            record = init.record
            graphs = verify_graphs(record["graphs"], record.get("graphs_fingerprint"), where, spec)
    model = build(spec, graphs)
    if init is not None:
        load_initial_weights(model, init, cfg["weights"], cfg["weights_strict"])
    fingerprint = graphs_fingerprint(get_graphs(model))
    check_same_on_all_ranks(fingerprint, "graph fingerprint")
    log.info(
        "model %s %s, graph seed %s, graph fingerprint %s",
        spec["name"], spec["kwargs"], cfg["model"]["seed"], fingerprint,
    )  # fmt: skip
    # Measured on the CPU model; written with config.yaml once everything is validated.
    complexity = log_complexity(model, cfg, in_ch) if d.is_main and tc["complexity"] else None

    model = prepare_model(model, cfg, d)
    params = [p for p in model.parameters() if p.requires_grad]
    batch = per_rank(tc["batch_size"], d, "train.batch_size")
    o = cfg["optim"]
    lr = scaled_lr(o["lr"], tc["batch_size"], o["reference_batch"])
    if o["name"] == "adam":  # the edge-popup paper's Adam baseline for learned dense weights
        optimizer = torch.optim.Adam(params, lr=lr, weight_decay=o["weight_decay"])
    else:
        optimizer = torch.optim.SGD(
            params, lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"],
            nesterov=o["nesterov"],
        )  # fmt: skip
    indices = subset_indices(len(train_set), cfg["data"]["train_subset"], cfg["seed"])
    sampler = TrainSampler(indices, batch, cfg["seed"], d.rank, d.world)
    ipe = sampler.batches_per_epoch
    if ipe < 1:
        raise ValueError(
            f"the training set ({len(indices)} images) is smaller than one batch per process "
            f"({batch}); lower --batch-size"
        )
    total = cfg["schedule"]["epochs"] * ipe
    warmup = round(cfg["schedule"]["warmup_epochs"] * ipe)
    factor = cfg["schedule"]["warmup_factor"]
    if factor is None:
        factor = min(1.0, o["reference_batch"] / tc["batch_size"])
    stones = [round(m * ipe) for m in cfg["schedule"]["milestones"]]
    if stones:
        scheduler = MultiStepWarmup(
            optimizer, lr, total, stones, cfg["schedule"]["gamma"],
            warmup_iters=warmup, warmup_factor=factor,
        )  # fmt: skip
    else:
        scheduler = CosineWarmup(optimizer, lr, total, warmup, factor)
    amp_dtype, use_scaler = amp_settings(cfg, d)
    scaler = torch.amp.GradScaler(d.device.type, enabled=use_scaler)
    ema = ModelEMA(model, tc["ema_decay"]) if tc["ema"] else None
    log.info(
        "lr %.4g = %.4g x global batch %d / reference batch %d; %d iterations/epoch, %d epochs,"
        " %d warmup iterations from %.3g x lr, %s",
        lr, o["lr"], tc["batch_size"], o["reference_batch"], ipe, cfg["schedule"]["epochs"],
        warmup, factor, f"x{cfg['schedule']['gamma']:g} at epochs {cfg['schedule']['milestones']}"
        if stones else "half-period cosine",
    )  # fmt: skip
    state = {
        "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "ema": ema,
        "amp": (amp_dtype, use_scaler), "writer": writer, "iters_per_epoch": ipe,
        "total_iters": total, "iteration": 0, "classes": classes, "skipped_train": 0,
        "metrics": {"best_top1": -1.0}, "last_path": os.path.join(out, ckpt_lib.LAST),
        "guard": DivergenceGuard(tc),
    }  # fmt: skip
    state["stop"] = stop  # the graceful_stop flag, voted on after every step

    # Per-rank stream for dropout and edge drop (the init above was identical on all ranks).
    seed_all(cfg["seed"] + 1_000_003 * (d.rank + 1))
    start_iter = 0
    if ckpt is not None:
        start_iter = load_training_state(ckpt, model, state, d, path)
    # Each rank looks for last.pth itself; one that started fresh (e.g. a node-local output
    # folder) next to ranks that resumed would drift apart silently, then hang.
    check_same_on_all_ranks(
        f"iteration {start_iter}",
        "resume point",
        "every rank must see the same last.pth: use an output folder shared by all nodes "
        "(--output-dir), or --resume PATH on each",
    )
    start_epoch, start_batch = divmod(start_iter, ipe)

    if d.distributed:
        device_ids = [d.local_rank] if d.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if tc["compile"]:
        model = torch.compile(model)
    train_loader = train_loader_for(train_set, sampler, batch, cfg, d)
    val_loader = eval_loader(val_set, cfg, d)
    if d.is_main:  # everything above validated: only now does this run write to the folder
        start_run_files(cfg, path, state, writer, complexity)

    result = dict(state["metrics"])
    for epoch in range(start_epoch, cfg["schedule"]["epochs"]):
        sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        t0 = time.perf_counter()
        train_loss = train_epoch(model, train_loader, epoch, sampler.start_batch, state, cfg, d)
        check_weights_finite(model, state, state["iteration"] - 1)
        last = epoch + 1 == cfg["schedule"]["epochs"]
        paths = [state["last_path"]]
        if last or (epoch + 1) % tc["eval_period"] == 0:
            if tc["precise_bn"]:
                precise_bn(model, train_set, indices, epoch, cfg, d, batch)
            result = run_eval(model, val_loader, epoch, state, cfg, d, train_loss, t0)
            if result["top1"] > state["metrics"]["best_top1"]:
                state["metrics"]["best_top1"] = result["top1"]
                paths.append(os.path.join(out, ckpt_lib.BEST))
            state["metrics"].update({k: result[k] for k in ("top1", "top5")})
            result["best_top1"] = state["metrics"]["best_top1"]
        save_checkpoint(paths, model, state, cfg, d)
        if stop is not None and not last and (signame := agree_on_stop(stop.signame, d)):
            save_and_stop(signame, model, state, cfg, d)  # saved just above

    if start_epoch >= cfg["schedule"]["epochs"]:
        log.info("training already finished at iteration %d; evaluating", start_iter)
        result = evaluate(ckpt_lib.unwrap(model), val_loader, d, cfg)
    final = {k: result.get(k) for k in ("top1", "top5", "count", "skipped")}
    final["best_top1"] = state["metrics"]["best_top1"]
    if d.is_main:
        log.info("checkpoints: %s", out)
        print(
            f"final top-1: {final['top1']:.2f}%  top-5: {final['top5']:.2f}%  "
            f"({final['count']} {('val' if cfg['data']['name'] == 'imagenet' else 'test')} "
            f"images, best top-1 {final['best_top1']:.2f}%)",
            flush=True,
        )
    return final


def start_run_files(cfg: dict, path: str | None, state: dict, writer, complexity) -> None:
    """Set aside the checkpoints of a run this one does not continue (a new run must never
    replace a good best.pth or last.pth), then write config.yaml and the complexity record."""
    out = cfg["output_dir"]
    own_last = os.path.join(out, ckpt_lib.LAST)
    continues = path is not None and os.path.realpath(path) == os.path.realpath(own_last)
    if not continues and any(os.path.isfile(os.path.join(out, n)) for n in ckpt_lib.CHECKPOINTS):
        writer.close()  # metrics.jsonl and tb/ move too; reopened fresh below
        moved = ckpt_lib.move_previous_run(out)
        writer.open()
        if moved:
            state["moved_to"] = moved[0]
            log.warning(
                "not continuing the run in %s: moved its %s to %s",
                out, ", ".join(moved[1]), moved[0],
            )  # fmt: skip
    atomic_write(os.path.join(out, "config.yaml"), lambda f: f.write(to_yaml(cfg)), mode="w")
    if complexity is not None:
        writer.write("model", 0, complexity)


def load_initial_weights(model: nn.Module, file: ModelFile, path: str, strict: bool) -> None:
    """Start training from a model file's weights (fine-tuning), not its training state.

    Another class count is the usual difference (or none at all, from a Detectron2 backbone):
    the classifier modules (``CLASSIFIER_MODULES``) then keep their fresh initialisation, and
    the log names them. Any other difference means weights of another network and is an
    error, as is any difference at all with ``weights_strict`` (``artifact.load_weights``).
    """
    bad = ckpt_lib.nonfinite_tensors(file.state)
    if bad:
        raise UserError(f"--weights {path!r}: its weights hold NaN/Inf (e.g. {bad[0]})")
    shape_fix = "pass weights of the same model (name, width, nodes, node op, stem) as the config"
    if file.kind == "detectron2":
        shape_fix += " (a Detectron2 backbone has 3 input channels and the ImageNet stem)"
    fixes = (shape_fix, "drop --weights-strict to re-initialise the classifier")
    fresh = load_weights(model, file.state, f"--weights {path!r}", strict, fixes)
    log.info(
        "initialised from %s (%s file, %d tensors)%s", path, file.kind, len(file.state),
        f"; freshly initialised: {', '.join(fresh)}" if fresh else "",
    )  # fmt: skip


def load_training_state(ckpt: dict, model, state: dict, d: DistInfo, path: str) -> int:
    """Restore everything needed to continue exactly; return the iteration to continue from."""
    model.load_state_dict(ckpt["model"])
    state["optimizer"].load_state_dict(ckpt["optimizer"])
    state["scheduler"].load_state_dict(ckpt["scheduler"])
    if ckpt.get("scaler") is not None and state["scaler"].is_enabled():
        state["scaler"].load_state_dict(ckpt["scaler"])
    if state["ema"] is not None and ckpt.get("ema") is not None:
        state["ema"].load_state_dict(ckpt["ema"], ckpt.get("ema_updates", 0))
    state["metrics"].update(ckpt.get("metrics") or {})
    state["skipped_train"] = int(ckpt.get("skipped_train", 0))
    state["guard"].load_state_dict(ckpt.get("guard"))  # the level of the run resumed
    it = int(ckpt["iteration"])
    old = ckpt.get("sampler") or {}
    ipe = state["iters_per_epoch"]
    rng = ckpt.get("rng") or []
    if old.get("iters_per_epoch") == ipe and old.get("world") == d.world and len(rng) == d.world:
        ckpt_lib.set_rng_state(rng[d.rank])
    else:
        restart = (it // old.get("iters_per_epoch", ipe)) * ipe
        log.warning(
            "the checkpoint was written with %s iterations/epoch on %s processes (now %d on %d): "
            "continuing from the start of its epoch (iteration %d), not bit-exactly",
            old.get("iters_per_epoch"), old.get("world"), ipe, d.world, restart,
        )  # fmt: skip
        it = restart
    state["iteration"] = it
    log.info("resumed from %s at epoch %d, iteration %d", path, it // ipe, it)
    return it


def run_eval(model, loader, epoch, state, cfg, d, train_loss, t0) -> dict:
    plain = ckpt_lib.unwrap(model)
    r = evaluate(plain, loader, d, cfg, f"eval {epoch + 1}")
    values = {**r, "epoch": epoch + 1, "train_loss": train_loss}
    if state["ema"] is not None:
        e = evaluate(state["ema"].module, loader, d, cfg, "eval ema")
        values.update({"ema_top1": e["top1"], "ema_top5": e["top5"]})
    values["epoch_time_s"] = time.perf_counter() - t0
    values["skipped_train_images"] = state["skipped_train"]
    state["writer"].write("eval", state["iteration"], values)
    ema_txt = f"  ema top-1 {values['ema_top1']:.2f}" if "ema_top1" in values else ""
    log.info(
        "epoch %d: top-1 %.2f%%  top-5 %.2f%%  val loss %.4f  (%d images, %d skipped)%s  "
        "epoch time %s",
        epoch + 1, r["top1"], r["top5"], r["loss"], r["count"], r["skipped"], ema_txt,
        _fmt_time(values["epoch_time_s"]),
    )  # fmt: skip
    return values


# ---------------------------------------------------------------------------- eval only


def eval_only(cfg: dict, d: DistInfo) -> dict:
    out = cfg["output_dir"]
    setup_logging(out, d.is_main)
    writer = MetricWriter(out, d.is_main, tensorboard=False)
    try:
        path = cfg["weights"]
        weights = "ema" if cfg["eval"]["ema"] else "model"
        file = read_model_file(path, weights=weights)
        if file.kind != "checkpoint":
            raise UserError(
                f"--eval-only --weights {path!r}: a {file.kind} file has no classifier to "
                "evaluate; pass a checkpoint written by tools/train_cls.py (best.pth)"
            )
        ckpt = file.record
        bad = ckpt_lib.nonfinite_tensors(file.state)
        if bad:  # any accuracy printed for them would be meaningless
            raise UserError(
                f"checkpoint {path!r}: its {weights} weights hold NaN/Inf ({len(bad)} tensors, "
                f"e.g. {bad[0]}); not evaluating them. Use a checkpoint written before the "
                f"run diverged (train_cls.py never saves such weights itself)"
            )
        _, val_set, classes, in_ch = build_datasets(cfg, train=False, classes=ckpt.get("classes"))
        log.info("%s", describe_data(cfg, None, val_set, classes))
        spec = model_spec(cfg, len(classes), in_ch)
        ckpt_lib.check_model_spec(ckpt, spec, path, eval_only=True)
        verify_graphs(ckpt["graphs"], ckpt.get("graphs_fingerprint"), path, spec)
        model = file.build(strict=True)
        check_same_on_all_ranks(graphs_fingerprint(get_graphs(model)), "graph fingerprint")
        model = prepare_model(model, cfg, d)
        r = evaluate(model, eval_loader(val_set, cfg, d), d, cfg)
        r.update({"weights": path, "which": weights, "test_size": cfg["data"]["test_size"]})
        writer.write("eval_only", int(ckpt.get("iteration", 0)), r)
        if d.is_main:
            print(
                f"{path} ({weights} weights) at {r['test_size']}px: top-1 {r['top1']:.2f}%  "
                f"top-5 {r['top5']:.2f}%  ({r['count']} images, {r['skipped']} skipped)",
                flush=True,
            )
        return r
    finally:
        writer.close()


def main(cfg: dict) -> dict:
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    d = init_distributed(cfg["device"])
    try:
        # Held before anything in the folder is read or written (stale temp files, last.pth,
        # config.yaml, logs). Evaluation takes it too: it appends to metrics.jsonl and log.txt.
        with output_dir_lock(cfg["output_dir"], d):
            if cfg["eval"]["only"]:
                return eval_only(cfg, d)
            return train(cfg, d)
    finally:
        cleanup()
        torch.set_num_threads(threads)
