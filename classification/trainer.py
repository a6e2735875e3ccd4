"""The training loop, top to bottom (pycls's ``trainer.py`` shape): ``main`` → ``train`` →
``train_epoch`` (with its checks and saves) → ``evaluate``; then ``eval_only``.

One call of ``main(cfg)`` is one run: single process, or one rank of a torchrun job. Only
rank 0 writes logs and checkpoints; every rank builds the model from the same config (or the
same checkpoint edge lists) and the graph fingerprints are compared before training starts.
What a run is built from lives in ``classification.builders`` and
``classification.training_run``; the checkpointed state and its schema in
``classification.checkpoint``.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from classification import checkpoint as ckpt_lib
from classification.builders import (
    AMP_DTYPES,
    autocast,
    describe_data,
    eval_loader,
    model_spec,
    precise_bn_batches,
    prepare_model,
)
from classification.data import build_datasets, no_readable_images
from classification.distributed import (
    DistInfo,
    agree_on_stop,
    all_gather_object,
    check_same_on_all_ranks,
    cleanup,
    init_distributed,
    output_dir_lock,
)
from classification.logger import (
    FILE_LOG_NAME,
    LOG_NAME,
    MetricWriter,
    progress,
    setup_logging,
    use_progress_bar,
)
from classification.meters import DeviceSums, EvalSums, SkipCounter, TrainWindow, mean_values
from classification.metrics import peak_memory_mb, topk_hits
from classification.precise_bn import recompute_bn_stats
from classification.training_run import Run, setup_run
from rwdet.graphs import graphs_fingerprint
from rwdet.models import get_graphs
from rwdet.models.artifact import read_model_file
from rwdet.models.verify import verify_graphs
from rwdet.run.errors import UserError
from rwdet.run.stop import StopRequested, graceful_stop

log = logging.getLogger(LOG_NAME)
file_log = logging.getLogger(FILE_LOG_NAME)  # log.txt only (while a tqdm bar is shown)


def main(cfg: dict) -> dict:
    threads = torch.get_num_threads()
    if cfg["threads"]:
        torch.set_num_threads(int(cfg["threads"]))
    d = init_distributed(cfg["device"])
    try:
        # Held before anything in the folder is read or written (stale temp files, last.pth,
        # config.yaml, logs). Evaluation takes it too: it appends to metrics.jsonl and log.txt.
        with output_dir_lock(cfg["output_dir"], d):
            return eval_only(cfg, d) if cfg["eval"]["only"] else train(cfg, d)
    finally:
        cleanup()
        torch.set_num_threads(threads)


def train(cfg: dict, d: DistInfo) -> dict:
    # SIGTERM (a scheduler's warning before it kills the job) and SIGINT only set a flag: the
    # run finishes its step, saves last.pth and raises StopRequested (see train_epoch).
    with graceful_stop() as stop:
        setup_logging(cfg["output_dir"], d.is_main)
        writer = MetricWriter(cfg["output_dir"], d.is_main)
        try:
            return train_model(*setup_run(cfg, d, writer, stop))
        finally:
            writer.close()


def train_model(run: Run, model: nn.Module, train_loader, val_loader) -> dict:
    """Epochs from the resume point; evaluate every ``eval_period`` epochs and after the last,
    save ``last.pth`` after each (and ``best.pth`` at a new best top-1)."""
    state, cfg, d = run.state, run.cfg, run.d
    start_epoch, start_batch = divmod(run.start_iter, state.iters_per_epoch)
    result = dict(state.metrics)
    for epoch in range(start_epoch, run.epochs):
        run.sampler.set_epoch(epoch, start_batch if epoch == start_epoch else 0)
        t0 = time.perf_counter()
        train_loss = train_epoch(run, model, train_loader, epoch, run.sampler.start_batch)
        check_weights_finite(run, model, state.iteration - 1)
        last = epoch + 1 == run.epochs
        paths = [state.last_path]
        if last or (epoch + 1) % cfg["train"]["eval_period"] == 0:
            if cfg["train"]["precise_bn"]:
                precise_bn(run, model, epoch)
            result = eval_epoch(run, model, val_loader, epoch, train_loss, t0)
            if result["top1"] > state.metrics["best_top1"]:
                state.metrics["best_top1"] = result["top1"]
                paths.append(os.path.join(cfg["output_dir"], ckpt_lib.BEST))
            state.metrics.update({k: result[k] for k in ("top1", "top5")})
            result["best_top1"] = state.metrics["best_top1"]
        save_checkpoint(run, model, paths)
        if run.stop is not None and not last and (signame := agree_on_stop(run.stop.signame, d)):
            save_and_stop(run, model, signame)  # saved just above

    if start_epoch >= run.epochs:
        log.info("training already finished at iteration %d; evaluating", run.start_iter)
        result = evaluate(ckpt_lib.unwrap(model), val_loader, d, cfg)
    final = {k: result.get(k) for k in ("top1", "top5", "count", "skipped")}
    final["best_top1"] = state.metrics["best_top1"]
    if d.is_main:
        log.info("checkpoints: %s", cfg["output_dir"])
        split = "val" if cfg["data"]["name"] == "imagenet" else "test"
        print(
            f"final top-1: {final['top1']:.2f}%  top-5: {final['top5']:.2f}%  "
            f"({final['count']} {split} images, best top-1 {final['best_top1']:.2f}%)",
            flush=True,
        )
    return final


def train_epoch(run: Run, model: nn.Module, loader, epoch: int, start_batch: int) -> float:
    """One epoch from batch ``start_batch``; returns the epoch's mean train loss."""
    state, cfg, d, ipe = run.state, run.cfg, run.d, run.state.iters_per_epoch
    tc = cfg["train"]
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg["optim"]["label_smoothing"])
    window = TrainWindow(d.device)  # summed over ranks at each log line
    epoch_loss, epoch_images = 0.0, 0.0  # over all ranks, from the logged windows
    skips, flushed, skipped_epoch = SkipCounter(), 0, 0
    bar_on = d.is_main and use_progress_bar()
    bar = progress(loader, len(loader), f"epoch {epoch + 1}/{run.epochs}", bar_on)
    t_last = time.perf_counter()
    t_window, data_time, steps_in_window = t_last, 0.0, 0
    model.train()
    for b, (images, targets, bad) in enumerate(bar, start=start_batch):
        data_time += time.perf_counter() - t_last
        it = epoch * ipe + b
        lr = state.scheduler.step(it)
        skips.add(bad)
        if images is None:
            if d.distributed:
                raise UserError(
                    f"every image of batch {b} on rank {d.rank} was unreadable; the ranks "
                    f"cannot stay in step. Remove the unreadable files listed above"
                )
            state.iteration = it + 1
            t_last = time.perf_counter()
            continue
        window.add_step(*train_step(run, model, criterion, images, targets), len(targets))
        state.iteration = it + 1
        steps_in_window += 1
        last_of_epoch = b + 1 == ipe
        if (it + 1) % tc["log_period"] == 0 or last_of_epoch:
            window.add(skipped=skips.count - flushed)
            flushed = skips.count
            sums = window.reduced()
            skipped_epoch += int(sums["skipped"])
            # All ranks' skips, checkpointed with the rest (up to the last logged window).
            state.skipped_train += int(sums["skipped"])
            check_finite(run, sums["nonfinite"], it)
            epoch_loss, epoch_images = epoch_loss + sums["loss"], epoch_images + sums["images"]
            elapsed = time.perf_counter() - t_window
            values = {
                "epoch": epoch + (b + 1) / ipe,
                **mean_values(sums),
                "lr": lr,
                "img_per_s": sums["images"] / max(elapsed, 1e-9),
                "data_time_ms": 1000 * data_time / max(steps_in_window, 1),
                "peak_mem_mb": peak_memory_mb(d.device),
                "skipped_images": skipped_epoch,
            }
            step_time = elapsed / max(steps_in_window, 1)
            log_window(run, values, epoch, b, it, step_time, bar if bar_on else None)
            # After the window is logged (so the spike is on record), before any save.
            state.guard.check_loss(values["loss"], it, state.kept_checkpoint())
            check_weights_finite(run, model, it)
            window.zero_()
            t_window, data_time, steps_in_window = time.perf_counter(), 0.0, 0
        period = tc["checkpoint_period"]
        if period and (it + 1) % period == 0 and not last_of_epoch:
            # The window is checked first so that no checkpoint ever holds diverged weights.
            check_finite(run, window.reduced("nonfinite")["nonfinite"], it)
            check_weights_finite(run, model, it)
            save_checkpoint(run, model, [state.last_path])
        # Every rank votes after every step, so all stop after the same one. The last step of
        # an epoch is left to the epoch's evaluation and save (the epoch loop stops after it).
        if run.stop is not None and not last_of_epoch:
            if signame := agree_on_stop(run.stop.signame, d):
                save_and_stop(run, model, signame, window)
        t_last = time.perf_counter()
    # Skips after the last flushed window (a final batch with no readable image is skipped
    # before the flush), and the images trained on since then (flushed only after a trained
    # batch); every rank runs the same number of batches, so all reach this.
    rest = DeviceSums(("skipped", "images"), d.device)
    rest.add(skipped=skips.count - flushed, images=window["images"])
    rest = rest.reduced()
    skipped_epoch += int(rest["skipped"])
    state.skipped_train += int(rest["skipped"])
    if start_batch == 0 and epoch_images + rest["images"] == 0:
        # Before the epoch's checkpoint: no step was taken, so there is nothing to save.
        raise no_readable_images(cfg, "train", skipped_epoch, f" in epoch {epoch + 1}")
    if skipped_epoch and d.is_main:
        log.warning("epoch %d: skipped %d unreadable training images", epoch + 1, skipped_epoch)
    return epoch_loss / max(epoch_images, 1)


def train_step(run: Run, model: nn.Module, criterion, images, targets):
    """Forward, backward (scaled under fp16), optional clipping, the optimizer step and the
    EMA update; (loss, top-1/top-5 hits) on the device."""
    state, d, cfg = run.state, run.d, run.cfg
    images = images.to(d.device, non_blocking=True)
    targets = targets.to(d.device, non_blocking=True)
    if cfg["train"]["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    with autocast(d, run.amp_dtype):
        logits = model(images)
        loss = criterion(logits.float(), targets)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if cfg["optim"]["clip_grad"]:
        state.scaler.unscale_(state.optimizer)
        trainable = (p for p in model.parameters() if p.requires_grad)
        nn.utils.clip_grad_norm_(trainable, cfg["optim"]["clip_grad"])
    state.scaler.step(state.optimizer)
    state.scaler.update()
    if state.ema is not None:
        state.ema.update(ckpt_lib.unwrap(model))
    return loss, topk_hits(logits.detach(), targets)


def log_window(run: Run, values: dict, epoch: int, b: int, it: int, step_time: float, bar):
    """metrics.jsonl/TensorBoard, the bar's postfix, and the log line (log.txt only under a bar)."""
    run.writer.write("train", it + 1, values)
    """``bar``: the tqdm bar, None without one."""
    if bar is not None:
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.4f}")
    if run.d.is_main:
        eta = (run.total_iters - it - 1) * step_time
        (file_log if bar is not None else log).info(
            "epoch %d/%d iter %d/%d  loss %.4f  top1 %.2f  top5 %.2f  lr %.5f  "
            "%.0f img/s  data %.1f ms  mem %.0f MB  eta %s",
            epoch + 1, run.epochs, b + 1, run.state.iters_per_epoch, values["loss"],
            values["top1"], values["top5"], values["lr"], values["img_per_s"],
            values["data_time_ms"], values["peak_mem_mb"], _fmt_time(eta),
        )  # fmt: skip


# ---------------------------------------------------------------------------- guards and saves


def check_weights_finite(run: Run, model: nn.Module, it: int) -> None:
    """The loss of a step is computed before its update, so a diverging update shows up in the
    weights first: NaN/Inf or beyond train.divergence_max_weight stop the run."""
    run.state.guard.check_weights(model, it, run.state.kept_checkpoint())


def check_finite(run: Run, nonfinite: float, it: int) -> None:
    """``nonfinite``: how many steps (over all ranks) had a NaN/Inf loss."""
    if nonfinite > 0:
        guard = run.state.guard
        raise guard.error(
            it, f"the training loss became NaN/Inf ({guard.level_text()})",
            run.state.kept_checkpoint(),
        )  # fmt: skip


def save_checkpoint(run: Run, model: nn.Module, paths: list[str]) -> None:
    """Collective (every rank sends its RNG state); rank 0 writes each path atomically.

    Every rank runs the divergence guard first (on the same numbers), so a diverged state is
    never written and all ranks stop together."""
    state = run.state
    state.guard.check_before_save(model, state.iteration - 1, state.kept_checkpoint())
    rng = all_gather_object(ckpt_lib.rng_state())
    if not run.d.is_main:
        return
    obj = state.to_checkpoint(model, run.config, rng, run.d.world)
    for path in paths:
        ckpt_lib.atomic_save(obj, path)
    state.saved_iteration = state.iteration


def save_and_stop(run: Run, model: nn.Module, signame: str, window: TrainWindow | None = None):
    """Write last.pth after the step just done (the guards of a periodic save apply, so a
    stop never writes diverged weights) and raise StopRequested: the same command resumes at
    the next iteration. ``window``: the unflushed window, whose non-finite losses are checked
    first; None when the state was already saved (at the end of an epoch)."""
    it = run.state.iteration - 1
    if window is not None:
        check_finite(run, window.reduced("nonfinite")["nonfinite"], it)
        check_weights_finite(run, model, it)
        save_checkpoint(run, model, [run.state.last_path])
    if run.d.is_main:
        log.warning("stopped by %s at iteration %d; resume with the same command", signame, it + 1)
    raise StopRequested(signame, f"iteration {it + 1}")


# ---------------------------------------------------------------------------- evaluation


def precise_bn(run: Run, model: nn.Module, epoch: int) -> None:
    """BN statistics of the final weights on ``train.precise_bn`` training images."""
    batches = precise_bn_batches(run.train_set, run.indices, epoch, run.cfg, run.d, run.batch)
    n = recompute_bn_stats(ckpt_lib.unwrap(model), batches, run.d.world)
    log.info("precise BN: statistics recomputed on %d batches of %d images", n, run.batch)


def eval_epoch(run: Run, model, loader, epoch: int, train_loss: float, t0: float) -> dict:
    """The model (and its EMA) on the validation split; logged and written to the metrics."""
    r = evaluate(ckpt_lib.unwrap(model), loader, run.d, run.cfg, f"eval {epoch + 1}")
    values = {**r, "epoch": epoch + 1, "train_loss": train_loss}
    if run.state.ema is not None:
        e = evaluate(run.state.ema.module, loader, run.d, run.cfg, "eval ema")
        values.update({"ema_top1": e["top1"], "ema_top5": e["top5"]})
    values["epoch_time_s"] = time.perf_counter() - t0
    values["skipped_train_images"] = run.state.skipped_train
    run.writer.write("eval", run.state.iteration, values)
    ema_txt = f"  ema top-1 {values['ema_top1']:.2f}" if "ema_top1" in values else ""
    log.info(
        "epoch %d: top-1 %.2f%%  top-5 %.2f%%  val loss %.4f  (%d images, %d skipped)%s  "
        "epoch time %s",
        epoch + 1, r["top1"], r["top5"], r["loss"], r["count"], r["skipped"], ema_txt,
        _fmt_time(values["epoch_time_s"]),
    )  # fmt: skip
    return values


@torch.no_grad()
def evaluate(model: nn.Module, loader, d: DistInfo, cfg: dict, desc: str = "eval") -> dict:
    """Top-1/top-5 over the whole split, each image counted once across all ranks."""
    amp_dtype = AMP_DTYPES.get(cfg["train"]["amp"]) if d.device.type == "cuda" else None
    was_training = model.training
    model.eval()
    sums, skips = EvalSums(d.device), SkipCounter()
    for images, targets, bad in progress(
        loader, len(loader), desc, d.is_main and use_progress_bar()
    ):
        skips.add(bad)
        if images is None:
            continue
        images = images.to(d.device, non_blocking=True)
        targets = targets.to(d.device, non_blocking=True)
        if cfg["train"]["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(d, amp_dtype):
            logits = model(images)
        logits = logits.float()
        hits = topk_hits(logits, targets)
        loss = F.cross_entropy(logits, targets, reduction="sum").double()
        sums.add(loss=loss, top1=hits[0], top5=hits[1], images=len(targets))
    sums.add(skipped=skips.count)
    total = sums.reduced()
    model.train(was_training)
    if total["images"] == 0:  # summed over ranks: every rank raises together
        raise no_readable_images(cfg, "val", int(total["skipped"]))
    m = mean_values(total)
    return {
        "top1": m["top1"], "top5": m["top5"], "loss": m["loss"],
        "count": int(total["images"]), "skipped": int(total["skipped"]),
    }  # fmt: skip


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


def _fmt_time(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
