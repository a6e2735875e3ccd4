"""Training configuration: commented defaults, YAML recipes and command-line overrides.

Resolution order (later wins): ``DEFAULTS`` -> the Fashion-MNIST profile (only when neither a
config file nor ``--data`` is given, so that ``train_cls.py --gen ws`` is a small CPU run) ->
``--config FILE`` -> flags such as ``--epochs`` -> dotted ``key=value`` overrides. Recipes are read
with ``yaml.safe_load`` and values of dotted overrides are parsed as YAML scalars; nothing is
ever evaluated as code. Unknown keys are errors, so a typo cannot silently do nothing.
"""

from __future__ import annotations

import copy
import os

import yaml

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist

DEFAULTS: dict = {
    # Run name; the output dir defaults to output/cls/<name>. None: derived from data and model.
    "name": None,
    # Where logs, metrics, TensorBoard events, the resolved config and checkpoints go.
    "output_dir": None,
    # "auto" (CUDA when available, else CPU), "cuda" or "cpu".
    "device": "auto",
    # Intra-op CPU threads for torch (torch.set_num_threads); None: torch's default.
    "threads": None,
    # Training seed: weight init, data order, augmentation, dropout, edge drop. Graphs use
    # model.seed, so the same wiring can be trained with several training seeds.
    "seed": 0,
    "model": {
        # A model registered in rwdet.models (rwdet.models.list_models()).
        "name": "randwire_small",
        # RandWire stage-graph generator: "er", "ba", "ws" or "complete"; None: the model's own.
        "gen": None,
        # Generator parameters (er: p; ba: m; ws: k, p); missing ones take the paper's defaults.
        "gen_params": {},
        # Graph seed: stage i uses rwdet.graphs.stage_seed(seed, i) (the paper uses 1..5);
        # None: the model's own default. Every key left None here is not passed to the model.
        "seed": None,
        # Wiring mode ("static" = RandWire, or a learned mode); None: the model's own.
        "wiring": None,
        # N, nodes per stage; None: the model's own default (32).
        "nodes": None,
        # C, the base width; None: the model's own default (78, 109 or 154), re-chosen to keep
        # FLOPs for another node_op (RandWire Figure 6).
        "channels": None,
        # Node operation: "sepconv" (paper default), "conv", "maxpool", "avgpool"; None: default.
        "node_op": None,
        # Any other build_model keyword (dropout, edge_drop, stem, head_channels, ...).
        "kwargs": {},
    },
    "data": {
        # "auto" (fashion_mnist without data.root, else imagenet), "imagenet" or "fashion_mnist".
        "name": "auto",
        # Folder in ImageNet layout: ROOT/train/<class>/* and ROOT/val/<class>/* (or validation).
        "root": None,
        # Fashion-MNIST idx files (train-images-idx3-ubyte.gz, ...).
        "fashion_mnist_dir": FASHION_MNIST_DIR,
        # Training crop (RandomResizedCrop for imagenet; resize of the 28 px images otherwise).
        "train_size": 224,
        # Evaluation crop (the RandWire paper's Table 4 evaluates at 320).
        "test_size": 224,
        # Evaluation resize before the center crop; None: test_size / 0.875 (256 for 224).
        "test_resize": None,
        # Data-loading worker processes per training process (0: load in the main process).
        "workers": 8,
        # Pinned host memory for faster host-to-GPU copies (ignored on CPU).
        "pin_memory": True,
        # Train on a fixed, seeded random subset of this many images; None: all of them.
        "train_subset": None,
        # Decode training JPEGs on the GPU (torchvision.io.decode_jpeg, device="cuda") instead of
        # PIL in the workers: for GPU machines with few CPU cores. ImageNet layout only.
        "gpu_decode": False,
    },
    "optim": {
        # SGD learning rate at optim.reference_batch; scaled linearly with the global batch.
        "lr": 0.1,
        # Batch size the lr is stated for (Goyal et al.: 0.1 per 256 images).
        "reference_batch": 256,
        # SGD momentum.
        "momentum": 0.9,
        # Nesterov momentum.
        "nesterov": False,
        # L2 weight decay on every trainable parameter.
        "weight_decay": 5e-5,
        # Label smoothing coefficient of the cross-entropy loss.
        "label_smoothing": 0.1,
        # Clip the global gradient norm to this value; None: no clipping.
        "clip_grad": None,
    },
    "schedule": {
        # Training epochs.
        "epochs": 100,
        # Linear warmup length in epochs (may be fractional); 0: no warmup.
        "warmup_epochs": 5.0,
        # Warmup starts at this fraction of the (scaled) lr and rises linearly to 1. None: Goyal
        # et al.'s rule, start at the reference-batch lr (factor reference_batch / global batch,
        # capped at 1: no warmup at or below the reference batch).
        "warmup_factor": None,
    },
    "train": {
        # Global batch size (summed over all processes); must divide by the process count.
        "batch_size": 256,
        # Mixed precision on CUDA: "bf16", "fp16" (with a gradient scaler) or "off".
        "amp": "off",
        # Use the channels_last memory format for the model and the inputs.
        "channels_last": False,
        # Wrap the model in torch.compile.
        "compile": False,
        # Convert BatchNorm to SyncBatchNorm when running on several CUDA processes.
        "sync_bn": False,
        # Keep an exponential moving average of the weights (evaluated next to the model).
        "ema": False,
        # EMA decay per iteration (ramped up from 0.1 over the first iterations).
        "ema_decay": 0.9999,
        # Log a plain line (off a terminal), JSON metrics and TensorBoard every this many steps.
        "log_period": 50,
        # Also write last.pth every this many iterations (0: only at the end of each epoch).
        "checkpoint_period": 0,
        # Evaluate every this many epochs (the last epoch is always evaluated).
        "eval_period": 1,
        # Before each evaluation, recompute BatchNorm statistics on this many training images
        # (precise BN; useful for short runs whose running averages lag). 0: off.
        "precise_bn": 0,
        # Log params and FLOPs (fvcore) at the start.
        "complexity": True,
        # true: resume from <output_dir>/last.pth when it exists; false: start afresh; or a path.
        "resume": True,
    },
    "eval": {
        # Only evaluate eval.weights (no training).
        "only": False,
        # Checkpoint to evaluate with eval.only.
        "weights": None,
        # Global evaluation batch size.
        "batch_size": 256,
        # Evaluate the checkpoint's EMA weights instead of the model weights (eval.only).
        "ema": False,
    },
}

# The embedded default: a small RandWire on Fashion-MNIST (28 px grayscale, 10 classes) that
# `python tools/train_cls.py --gen ws` trains on 2 CPU cores in a few minutes.
# configs/cls/fashion_mnist.yaml holds the same values (a test keeps them equal).
FASHION_MNIST_PROFILE: dict = {
    "threads": 1,
    "model": {
        "name": "randwire_small",
        "gen": "ws",
        "seed": 1,
        "wiring": "static",
        "channels": 16,
        "nodes": 8,
        "kwargs": {"stem": "small", "head_channels": 256},
    },
    "data": {
        "name": "fashion_mnist",
        "train_size": 28,
        "test_size": 28,
        "workers": 0,
        "train_subset": None,
    },
    "optim": {"lr": 0.2, "reference_batch": 256, "weight_decay": 5e-5, "label_smoothing": 0.1},
    "schedule": {"epochs": 2, "warmup_epochs": 0.2, "warmup_factor": 0.1},
    "train": {
        "batch_size": 128,
        "channels_last": True,
        "log_period": 50,
        "checkpoint_period": 200,
        "precise_bn": 4096,
    },
    "eval": {"batch_size": 500},
}

CONFIG_DIR = os.path.join("configs", "cls")


def merge(base: dict, update: dict, where: str = "") -> dict:
    """Recursively merge ``update`` into a copy of ``base``; unknown keys are errors.

    Dict-valued leaves that are free-form (model.gen_params, model.kwargs) are replaced whole,
    so a recipe's gen_params never mix with another generator's.
    """
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        path = f"{where}{key}"
        if key not in out:
            raise ValueError(
                f"unknown config key {path!r}; valid keys here: {sorted(out)} "
                f"(see classification/config.py)"
            )
        if isinstance(out[key], dict) and path not in _FREE_FORM:
            if not isinstance(value, dict):
                raise ValueError(f"config key {path!r} is a section; give a mapping, not {value!r}")
            out[key] = merge(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


_FREE_FORM = {"model.gen_params", "model.kwargs"}


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"config file {path!r} does not exist; recipes live in {CONFIG_DIR}/ "
            f"({', '.join(list_recipes()) or 'none found'})"
        )
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping at the top level")
    return data


def list_recipes() -> list[str]:
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith((".yaml", ".yml")))


def parse_override(item: str) -> dict:
    """``"optim.lr=0.05"`` -> ``{"optim": {"lr": 0.05}}`` (value parsed as a YAML scalar)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise ValueError(f"override {item!r}: cannot parse value {raw!r}: {e}") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def resolve(
    config_file: str | None = None, flags: dict | None = None, overrides: list | None = None
) -> dict:
    """The full config: defaults, profile, recipe, flags (a partial config dict), overrides."""
    flags = copy.deepcopy(flags or {})
    recipe = load_yaml(config_file) if config_file else {}
    cfg = copy.deepcopy(DEFAULTS)
    data_root = (flags.get("data") or {}).get("root", (recipe.get("data") or {}).get("root"))
    if not config_file and data_root is None:
        cfg = merge(cfg, FASHION_MNIST_PROFILE)
    cfg = merge(cfg, recipe)
    # Another generator (--gen, or a model.gen= override, the last one winning) drops the
    # recipe's parameters; the command line's own (--k/--p/--m, model.gen_params.*) stay.
    gen = (flags.get("model") or {}).get("gen")
    for item in overrides or []:
        if item.split("=", 1)[0].strip() == "model.gen":
            gen = parse_override(item)["model"]["gen"]
    if gen is not None and gen != cfg["model"]["gen"]:
        cfg["model"]["gen_params"] = {}
    gen_params = (flags.get("model") or {}).pop("gen_params", None)
    cfg = merge(cfg, flags)
    if gen_params:
        cfg["model"]["gen_params"] = {**cfg["model"]["gen_params"], **gen_params}
    for item in overrides or []:
        cfg = apply_override(cfg, item)
    return finalize(cfg)


def apply_override(cfg: dict, item: str) -> dict:
    """One ``key=value`` override on a full config.

    Inside a free-form section (``model.kwargs.dropout=0.3``) it sets that one key and keeps
    the section's others; ``model.kwargs={...}`` still replaces the section whole.
    """
    update = parse_override(item)
    key = item.split("=", 1)[0].strip()
    for section in _FREE_FORM:
        if key.startswith(section + "."):
            head, name = section.split(".")
            out = copy.deepcopy(cfg)
            out[head][name] = _update_free_form(out[head][name], update[head][name])
            return out
    return merge(cfg, update)


def _update_free_form(base, update: dict) -> dict:
    out = dict(base) if isinstance(base, dict) else {}
    for k, v in update.items():
        out[k] = _update_free_form(out.get(k), v) if isinstance(v, dict) else v
    return out


def finalize(cfg: dict) -> dict:
    """Fill derived values (data name, run name, output dir) and check cross-key rules."""
    data = cfg["data"]
    if data["name"] == "auto":
        data["name"] = "fashion_mnist" if data["root"] is None else "imagenet"
    if data["name"] not in ("imagenet", "fashion_mnist"):
        raise ValueError(
            f"data.name={data['name']!r} is not known; use 'imagenet' (folder layout), "
            f"'fashion_mnist' or 'auto'"
        )
    if data["name"] == "imagenet" and not data["root"]:
        raise ValueError(
            "this recipe trains on a folder in ImageNet layout but no data root was given; "
            "pass --data ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*)"
        )
    if cfg["train"]["amp"] not in ("off", "bf16", "fp16"):
        raise ValueError(f"train.amp={cfg['train']['amp']!r} is not known; use bf16, fp16 or off")
    if cfg["device"] not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device={cfg['device']!r} is not known; use auto, cpu or cuda")
    for section, key, least in (
        ("schedule", "epochs", 1),
        ("train", "batch_size", 1),
        ("train", "log_period", 1),
        ("train", "eval_period", 1),
        ("train", "checkpoint_period", 0),
        ("train", "precise_bn", 0),
    ):
        value = cfg[section][key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "a positive integer" if least else "an integer >= 0"
            raise ValueError(f"{section}.{key}={value!r} must be {kind}")
    warmup = cfg["schedule"]["warmup_epochs"]
    if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup < 0:
        raise ValueError(f"schedule.warmup_epochs={warmup!r} must be a number >= 0")
    if cfg["eval"]["only"] and not cfg["eval"]["weights"]:
        raise ValueError("--eval-only needs --weights PATH (a checkpoint written by train_cls.py)")
    if cfg["name"] is None:
        cfg["name"] = run_name(cfg)
    if cfg["output_dir"] is None:
        cfg["output_dir"] = os.path.join("output", "cls", cfg["name"])
    return cfg


def run_name(cfg: dict) -> str:
    m = cfg["model"]
    parts = [cfg["data"]["name"], m["name"]]
    if m["gen"]:
        params = "".join(f"-{k}{v}" for k, v in sorted(m["gen_params"].items()))
        parts.append(f"{m['gen']}{params}")
    if m["seed"] is not None:
        parts.append(f"seed{m['seed']}")
    return "_".join(parts)


def to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
