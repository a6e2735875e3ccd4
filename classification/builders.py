"""What a run is built from its config: the model (fresh, resumed or fine-tuned), the optimizer,
the lr schedule, AMP, and the data loaders (pycls's ``builders``/``setup_model`` part of
``trainer.py``, kept apart so that ``classification.trainer`` holds only the loop)."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import nullcontext

import torch
from torch import nn
from torch.utils.data import DataLoader

from classification import checkpoint as ckpt_lib
from classification.data import ImageFolderDataset, collate_skip_bad, worker_init
from classification.distributed import DistInfo
from classification.logger import LOG_NAME
from classification.sampler import EvalSampler, TrainSampler
from classification.schedule import LrSchedule, scaled_lr
from rwdet.models import build_model, model_capabilities
from rwdet.models.artifact import ModelFile, load_weights, read_model_file
from rwdet.models.verify import verify_graphs
from rwdet.run.errors import UserError

log = logging.getLogger(LOG_NAME)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------- model


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


def resume_path(cfg: dict) -> str | None:
    resume = cfg["train"]["resume"]
    if resume is True:
        return ckpt_lib.latest_checkpoint(cfg["output_dir"])
    if not resume:  # the folder's checkpoints are moved aside later (start_run_files)
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint")
    return resume


def model_for_run(cfg: dict, spec: dict, classes: list, path: str | None, ckpt: dict | None):
    """The model a training run starts from: the graphs of the checkpoint it resumes (its
    weights are loaded with the rest of the state), or the weights it fine-tunes, or fresh."""
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
            record = init.record
            graphs = verify_graphs(
                record["graphs"], record.get("graphs_fingerprint"), cfg["weights"], spec
            )
    model = build(spec, graphs)
    if init is not None:
        load_initial_weights(model, init, cfg["weights"], cfg["weights_strict"])
    return model


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


def log_complexity(model: nn.Module, cfg: dict, in_channels: int) -> dict | None:
    """Log params and FLOPs; the record for metrics.jsonl is returned, written once the run
    has passed validation (a run that dies on a bad value writes nothing)."""
    size = cfg["data"]["test_size"]
    try:
        with warnings.catch_warnings():  # a model's own deprecation warnings, not the run's
            warnings.simplefilter("ignore", FutureWarning)
            from rwdet.complexity import complexity

            c = complexity(model, size, in_channels)
    except Exception as e:  # noqa: BLE001 - a counting problem must not stop training
        log.warning("complexity: could not count this model (%s)", e)
        return None
    log.info(
        "model %s: %.3fM params, %.1fM FLOPs (multiply-adds) at %dx%d",
        cfg["model"]["name"], c["params"] / 1e6, c["flops"] / 1e6, size, size,
    )  # fmt: skip
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


def wrap_model(model: nn.Module, cfg: dict, d: DistInfo) -> nn.Module:
    """DDP over the ranks, then ``torch.compile`` (``checkpoint.unwrap`` undoes both)."""
    if d.distributed:
        device_ids = [d.local_rank] if d.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg["train"]["compile"]:
        model = torch.compile(model)
    return model


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- optimization


def build_optimizer(model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    """SGD (every recipe of the papers), or Adam for edge-popup's learned-dense baseline; only
    trainable parameters (popup's fixed weights are not)."""
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg["optim"]
    lr = scaled_lr(o["lr"], cfg["train"]["batch_size"], o["reference_batch"])
    if o["name"] == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=o["weight_decay"])
    return torch.optim.SGD(
        params, lr=lr, momentum=o["momentum"], weight_decay=o["weight_decay"],
        nesterov=o["nesterov"],
    )  # fmt: skip


def build_scheduler(cfg: dict, optimizer, iters_per_epoch: int, global_batch: int) -> LrSchedule:
    """The recipe's epochs as iterations: warmup and milestones round to whole iterations; a
    null ``warmup_factor`` starts at the reference batch's lr (Goyal et al.)."""
    o, s = cfg["optim"], cfg["schedule"]
    lr = scaled_lr(o["lr"], global_batch, o["reference_batch"])
    factor = s["warmup_factor"]
    if factor is None:
        factor = min(1.0, o["reference_batch"] / global_batch)
    stones = [round(m * iters_per_epoch) for m in s["milestones"]]
    sched = LrSchedule(
        optimizer, lr, s["epochs"] * iters_per_epoch, round(s["warmup_epochs"] * iters_per_epoch),
        factor, stones, s["gamma"],
    )  # fmt: skip
    log.info(
        "lr %.4g = %.4g x global batch %d / reference batch %d; %d iterations/epoch, %d epochs,"
        " %d warmup iterations from %.3g x lr, %s",
        lr, o["lr"], global_batch, o["reference_batch"], iters_per_epoch, s["epochs"],
        sched.warmup_iters, factor,
        f"x{s['gamma']:g} at epochs {s['milestones']}" if stones else "half-period cosine",
    )  # fmt: skip
    return sched


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


# ---------------------------------------------------------------------------- data


def per_rank(global_batch: int, d: DistInfo, what: str) -> int:
    if global_batch % d.world:
        raise ValueError(
            f"{what}={global_batch} does not divide by the {d.world} processes; pick a multiple "
            f"of {d.world}"
        )
    return global_batch // d.world


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


def eval_loader(val_set, cfg: dict, d: DistInfo):
    bs = per_rank(cfg["eval"]["batch_size"], d, "eval.batch_size")
    return make_loader(val_set, EvalSampler(len(val_set), d.rank, d.world), bs, cfg, d, 0)


def precise_bn_batches(train_set, indices, epoch: int, cfg: dict, d: DistInfo, batch: int):
    """The image batches of ``train.precise_bn`` training images, in an order fixed per epoch
    (own sampler seed), so that a resumed run recomputes the same statistics; a batch of
    unreadable images counts but is not yielded."""
    sampler = TrainSampler(indices, batch, cfg["seed"] + 1, d.rank, d.world)
    sampler.set_epoch(epoch)
    n_batches = max(1, -(-cfg["train"]["precise_bn"] // (batch * d.world)))
    loader = make_loader(train_set, sampler, batch, cfg, d, cfg["seed"], persistent=False)
    for i, (images, _, _) in enumerate(loader):
        if i >= n_batches:
            break
        if images is not None:
            images = images.to(d.device, non_blocking=True)
            if cfg["train"]["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images


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
