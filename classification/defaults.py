"""The default training configuration, one commented line per key (pycls's ``config.py`` shape).

Every key is written here as ``_C.section.key = value`` with the comment above it saying what
the key does; ``key_comments()`` reads those comments back from this file, so the comment is
the key's only documentation and ``config.yaml`` in a run folder carries it. Keys stay lower
case (``optim.lr``): fvcore/yacs do not require upper case, and recipes, study specs and users'
command lines written before the move to ``CfgNode`` keep working. Sections declared with
``new_allowed=True`` are free-form: their keys are the model's own keywords, passed through.
Values are checked by ``classification.config.SCHEMA`` (one rule per key), not here.
"""

from __future__ import annotations

import ast
import functools

from fvcore.common.config import CfgNode

# Debian package dataset-fashion-mnist: where the embedded data lives.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_C = CfgNode()

# ------------------------------------------------------------------------------ run
# Run name; the output dir defaults to output/cls/<name>. None: derived from data and model.
_C.name = None
# Where logs, metrics, TensorBoard events, the resolved config and checkpoints go.
_C.output_dir = None
# "auto" (CUDA when available, else CPU), "cuda" or "cpu".
_C.device = "auto"
# Intra-op CPU threads for torch (torch.set_num_threads); None: torch's default.
_C.threads = None
# Training seed: weight init, data order, augmentation, dropout, edge drop. Graphs use
# model.seed, so the same wiring can be trained with several training seeds.
_C.seed = 0
# A checkpoint written by train_cls.py. With eval.only it is evaluated; otherwise training
# starts from its weights (fine-tuning: graphs from the checkpoint, checked against the
# model asked for; optimizer, schedule and epoch start afresh). A resumed run continues its
# own last.pth instead. None: train from a random initialisation.
_C.weights = None
# Fine-tuning: false re-initialises classifier tensors whose shape differs (another class
# count) and says which; true requires every tensor to fit. Other differences are errors.
_C.weights_strict = False

# ------------------------------------------------------------------------------ model
# What is built: the build_model name and the keywords it is given.
_C.model = CfgNode()
# A model registered in rwdet.models (rwdet.models.list_models()).
_C.model.name = "randwire_small"
# RandWire stage-graph generator: "er", "ba", "ws" or "complete"; None: the model's own.
_C.model.gen = None
# Generator parameters (er: p; ba: m; ws: k, p); missing ones take the paper's defaults.
_C.model.gen_params = CfgNode(new_allowed=True)
# Graph seed: stage i uses rwdet.graphs.stage_seed(seed, i) (the paper uses 1..5);
# None: the model's own default. Every key left None here is not passed to the model.
_C.model.seed = None
# Wiring mode ("static" = RandWire, or a learned mode); None: the model's own.
_C.model.wiring = None
# N, nodes per stage; None: the model's own default (32).
_C.model.nodes = None
# C, the base width; None: the model's own default (78, 109 or 154), re-chosen to keep
# FLOPs for another node_op (RandWire Figure 6).
_C.model.channels = None
# Node operation: "sepconv" (paper default), "conv", "maxpool", "avgpool"; None: default.
_C.model.node_op = None
# Any other build_model keyword (dropout, edge_drop, stem, head_channels, ...).
_C.model.kwargs = CfgNode(new_allowed=True)

# ------------------------------------------------------------------------------ data
# The training and evaluation images and how they are read.
_C.data = CfgNode()
# "auto" (fashion_mnist without data.root, else imagenet, or the name in a root given as
# NAME:PATH), "imagenet", "fashion_mnist", "cifar10" or "cifar100".
_C.data.name = "auto"
# Folder in ImageNet layout: ROOT/train/<class>/* and ROOT/val/<class>/* (or validation);
# for cifar10/cifar100 the root torchvision's CIFAR10(root) takes (or the batches folder
# itself), also written cifar10:PATH / cifar100:PATH.
_C.data.root = None
# Fashion-MNIST idx files (train-images-idx3-ubyte.gz, ...).
_C.data.fashion_mnist_dir = FASHION_MNIST_DIR
# Training crop (RandomResizedCrop for imagenet; resize of the 28 px images otherwise).
_C.data.train_size = 224
# Evaluation crop (the RandWire paper's Table 4 evaluates at 320).
_C.data.test_size = 224
# Evaluation resize before the center crop; None: test_size / 0.875 (256 for 224).
_C.data.test_resize = None
# Data-loading worker processes per training process (0: load in the main process).
_C.data.workers = 8
# Pinned host memory for faster host-to-GPU copies (ignored on CPU).
_C.data.pin_memory = True
# Train on a fixed, seeded random subset of this many images; None: all of them.
_C.data.train_subset = None
# Decode training JPEGs on the GPU (torchvision.io.decode_jpeg, device="cuda") instead of
# PIL in the workers: for GPU machines with few CPU cores. ImageNet layout only.
_C.data.gpu_decode = False

# ------------------------------------------------------------------------------ optim
# The optimizer and the loss.
_C.optim = CfgNode()
# "sgd", or "adam" (torch.optim.Adam, default betas; momentum and nesterov unused): the
# edge-popup paper's learned-dense Adam baseline (§4.1), without lr decay there (give
# schedule.milestones [0.5] with schedule.gamma 1.0 for a constant lr).
_C.optim.name = "sgd"
# SGD learning rate at optim.reference_batch; scaled linearly with the global batch.
_C.optim.lr = 0.1
# Batch size the lr is stated for (Goyal et al.: 0.1 per 256 images).
_C.optim.reference_batch = 256
# SGD momentum.
_C.optim.momentum = 0.9
# Nesterov momentum.
_C.optim.nesterov = False
# L2 weight decay on every trainable parameter.
_C.optim.weight_decay = 5e-5
# Label smoothing coefficient of the cross-entropy loss.
_C.optim.label_smoothing = 0.1
# Clip the global gradient norm to this value; None: no clipping.
_C.optim.clip_grad = None

# ------------------------------------------------------------------------------ schedule
# The learning-rate schedule over the epochs.
_C.schedule = CfgNode()
# Training epochs.
_C.schedule.epochs = 100
# Linear warmup length in epochs (may be fractional); 0: no warmup.
_C.schedule.warmup_epochs = 5.0
# Warmup starts at this fraction of the (scaled) lr and rises linearly to 1. None: Goyal
# et al.'s rule, start at the reference-batch lr (factor reference_batch / global batch,
# capped at 1: no warmup at or below the reference batch).
_C.schedule.warmup_factor = None
# Step decay instead of the cosine: epochs at which the lr is multiplied by
# schedule.gamma (the DNW small-scale recipe: [80, 120] of 160). Empty: cosine.
_C.schedule.milestones = []
# Factor applied to the lr at each of schedule.milestones.
_C.schedule.gamma = 0.1

# ------------------------------------------------------------------------------ train
# How the training loop runs, logs, saves and guards itself.
_C.train = CfgNode()
# Global batch size (summed over all processes); must divide by the process count.
_C.train.batch_size = 256
# Mixed precision on CUDA: "bf16", "fp16" (with a gradient scaler) or "off".
_C.train.amp = "off"
# Use the channels_last memory format for the model and the inputs.
_C.train.channels_last = False
# Wrap the model in torch.compile.
_C.train.compile = False
# Convert BatchNorm to SyncBatchNorm when running on several CUDA processes.
_C.train.sync_bn = False
# Keep an exponential moving average of the weights (evaluated next to the model).
_C.train.ema = False
# EMA decay per iteration (ramped up from 0.1 over the first iterations).
_C.train.ema_decay = 0.9999
# Log a plain line (off a terminal), JSON metrics and TensorBoard every this many steps.
_C.train.log_period = 50
# Also write last.pth every this many iterations (0: only at the end of each epoch).
_C.train.checkpoint_period = 0
# Evaluate every this many epochs (the last epoch is always evaluated).
_C.train.eval_period = 1
# Before each evaluation, recompute BatchNorm statistics on this many training images
# (precise BN; useful for short runs whose running averages lag). 0: off.
_C.train.precise_bn = 0
# Log params and FLOPs (fvcore) at the start.
_C.train.complexity = True
# true: resume from <output_dir>/last.pth when it exists; false: start afresh; or a path.
# A run that does not continue <output_dir>/last.pth (false, or another path) first moves
# the folder's last.pth, best.pth, metrics.jsonl, config.yaml and tb/ into
# <output_dir>/previous/<UTC time>/ (logged): a new run never replaces a good checkpoint.
_C.train.resume = True
# Divergence guard, checked at every logged window (train.log_period) and before every
# save; a diverged run stops with the last good checkpoint untouched. A window's loss
# counts as a spike above max(divergence_factor x its running mean (an EMA over the
# windows), running mean + divergence_margin); divergence_patience spikes in a row stop
# the run, and a save due right after a spiking window stops it too.
_C.train.divergence_factor = 10.0
# Absolute slack in loss units (nats) above the running mean, for nearly-zero losses.
_C.train.divergence_margin = 2.0
# Consecutive logged windows above the limit that stop the run.
_C.train.divergence_patience = 3
# Stop when any trainable weight's magnitude exceeds this (a healthy run stays far
# below); 0: no bound. NaN/Inf losses or weights always stop the run.
_C.train.divergence_max_weight = 1.0e4

# ------------------------------------------------------------------------------ eval
# Evaluation of a trained or given checkpoint.
_C.eval = CfgNode()
# Only evaluate the checkpoint given as weights (no training).
_C.eval.only = False
# Global evaluation batch size.
_C.eval.batch_size = 256
# Evaluate the checkpoint's EMA weights instead of the model weights (eval.only).
_C.eval.ema = False


def get_defaults() -> CfgNode:
    """A fresh, mutable copy of the defaults (detectron2's ``get_cfg()``)."""
    return _C.clone()


def free_form_sections(node: CfgNode = _C, where: str = "") -> set[str]:
    """The dotted paths of the sections declared ``new_allowed`` (model keywords)."""
    found = set()
    for key, value in node.items():
        if isinstance(value, CfgNode):
            path = where + key
            if value.is_new_allowed():
                found.add(path)
            else:
                found |= free_form_sections(value, path + ".")
    return found


def _dotted(target) -> str | None:
    """``"optim.lr"`` for the assignment target ``_C.optim.lr``; None for anything else."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name) and target.id == "_C" and parts:
        return ".".join(reversed(parts))
    return None


@functools.cache
def key_comments() -> dict[str, str]:
    """``{dotted key: the comment lines right above its assignment in this file}``.

    Read from the source so that the comment written next to a default is the one shown in a
    run's config.yaml; a key without a comment maps to "".
    """
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    lines = source.splitlines()
    found = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        path = _dotted(node.targets[0])
        if path is None:
            continue
        above, row = [], node.lineno - 2
        while row >= 0 and lines[row].lstrip().startswith("#"):
            text = lines[row].strip().lstrip("#").strip()
            if text.startswith("---"):  # a section rule, not the key's comment
                break
            above.append(text)
            row -= 1
        found[path] = " ".join(reversed(above))
    return found
