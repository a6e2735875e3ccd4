"""Training configuration: commented defaults, YAML recipes and command-line overrides.

Resolution order (later wins): ``DEFAULTS`` -> the Fashion-MNIST profile (only when neither a
config file nor ``--data`` is given, so that ``train_cls.py --gen ws`` is a small CPU run) ->
``--config FILE`` -> flags such as ``--epochs`` -> dotted ``key=value`` overrides. Recipes and
override values are read by a safe YAML loader with YAML 1.2 scalars; nothing is ever evaluated
as code. Unknown keys are errors, so a typo cannot silently do nothing, and every value is
checked against its key's rule in ``SCHEMA`` once the sources are merged, so a bad value is one
line naming the key instead of a traceback from deep inside the trainer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from typing import NamedTuple

import yaml

from rwdet.models.args import GEN_CHOICES, NODE_OP_CHOICES  # live registry views
from rwdet.run.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
DATA_NAMES = ("auto", "imagenet", "fashion_mnist", "cifar10", "cifar100")
# data.root given as NAME:PATH names the dataset (--data cifar10:/data/cifar).
_PREFIXED_ROOT = re.compile(r"^(imagenet|cifar10|cifar100):(.+)$")

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
    # A checkpoint written by train_cls.py. With eval.only it is evaluated; otherwise training
    # starts from its weights (fine-tuning: graphs from the checkpoint, checked against the
    # model asked for; optimizer, schedule and epoch start afresh). A resumed run continues its
    # own last.pth instead. None: train from a random initialisation.
    "weights": None,
    # Fine-tuning: false re-initialises classifier tensors whose shape differs (another class
    # count) and says which; true requires every tensor to fit. Other differences are errors.
    "weights_strict": False,
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
        # "auto" (fashion_mnist without data.root, else imagenet, or the name in a root given as
        # NAME:PATH), "imagenet", "fashion_mnist", "cifar10" or "cifar100".
        "name": "auto",
        # Folder in ImageNet layout: ROOT/train/<class>/* and ROOT/val/<class>/* (or validation);
        # for cifar10/cifar100 the root torchvision's CIFAR10(root) takes (or the batches folder
        # itself), also written cifar10:PATH / cifar100:PATH.
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
        # "sgd", or "adam" (torch.optim.Adam, default betas; momentum and nesterov unused): the
        # edge-popup paper's learned-dense Adam baseline (§4.1), without lr decay there (give
        # schedule.milestones=[0.5] with schedule.gamma=1.0 for a constant lr).
        "name": "sgd",
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
        # Step decay instead of the cosine: epochs at which the lr is multiplied by
        # schedule.gamma (the DNW small-scale recipe: [80, 120] of 160). Empty: cosine.
        "milestones": [],
        # Factor applied to the lr at each of schedule.milestones.
        "gamma": 0.1,
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
        # A run that does not continue <output_dir>/last.pth (false, or another path) first moves
        # the folder's last.pth, best.pth, metrics.jsonl, config.yaml and tb/ into
        # <output_dir>/previous/<UTC time>/ (logged): a new run never replaces a good checkpoint.
        "resume": True,
        # Divergence guard, checked at every logged window (train.log_period) and before every
        # save; a diverged run stops with the last good checkpoint untouched. A window's loss
        # counts as a spike above max(divergence_factor x its running mean (an EMA over the
        # windows), running mean + divergence_margin); divergence_patience spikes in a row stop
        # the run, and a save due right after a spiking window stops it too.
        "divergence_factor": 10.0,
        # Absolute slack in loss units (nats) above the running mean, for nearly-zero losses.
        "divergence_margin": 2.0,
        # Consecutive logged windows above the limit that stop the run.
        "divergence_patience": 3,
        # Stop when any trainable weight's magnitude exceeds this (a healthy run stays far
        # below); 0: no bound. NaN/Inf losses or weights always stop the run.
        "divergence_max_weight": 1.0e4,
    },
    "eval": {
        # Only evaluate the checkpoint given as weights (no training).
        "only": False,
        # Global evaluation batch size.
        "batch_size": 256,
        # Evaluate the checkpoint's EMA weights instead of the model weights (eval.only).
        "ema": False,
    },
}

# ---------------------------------------------------------------------------- value rules

# Sections whose keys are not fixed: they pass through to the model (and are replaced whole).
_FREE_FORM = {"model.gen_params", "model.kwargs"}


class Rule(NamedTuple):
    """What one config key accepts; ``kind`` and ``example`` default to its DEFAULTS value's."""

    kind: type | tuple | None = None  # bool, int, float, str, dict or a tuple of them
    bound: str = ""  # for numbers: a key of _BOUNDS
    choices: tuple = ()
    none: bool = False  # null (None) allowed
    example: object = None
    expected: str = ""  # the wording of what is accepted, where the generic one would not do


_BOUNDS = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    # A learning rate reaches float32 kernels: beyond float32's range SGD fails with an overflow.
    "> 0 and < 3.4e38": lambda v: 0 < v < 3.4e38,
}
_NUMBER = (int, float)  # an int or a float, kept as given (generator parameters)

# Keys whose type or example cannot be read off DEFAULTS (None defaults), and every range.
_RULES: dict[str, Rule] = {
    "name": Rule(str, none=True, example="my_run"),
    "output_dir": Rule(str, none=True, example="output/cls/my_run"),
    "device": Rule(choices=("auto", "cpu", "cuda"), example="cpu"),
    "threads": Rule(int, ">= 1", none=True, example=4),
    "model.gen": Rule(str, choices=GEN_CHOICES, none=True, example="ws"),
    "model.gen_params": Rule(dict, example="{k: 4, p: 0.75}", expected="a mapping of numbers"),
    "model.seed": Rule(int, none=True, example=1),
    "model.wiring": Rule(str, none=True, example="static"),
    "model.nodes": Rule(int, ">= 1", none=True, example=32),
    "model.channels": Rule(int, ">= 1", none=True, example=78),
    "model.node_op": Rule(str, choices=NODE_OP_CHOICES, none=True, example="conv"),
    "model.kwargs": Rule(dict, example="{dropout: 0.2}"),
    "data.name": Rule(choices=DATA_NAMES, example="imagenet"),
    "data.root": Rule(str, none=True, example="/data/imagenet"),
    "data.train_size": Rule(bound=">= 1"),
    "data.test_size": Rule(bound=">= 1"),
    "data.test_resize": Rule(int, ">= 1", none=True, example=256),
    "data.workers": Rule(bound=">= 0"),
    "data.train_subset": Rule(int, ">= 1", none=True, example=10000),
    "optim.name": Rule(choices=("sgd", "adam"), example="adam"),
    "optim.lr": Rule(bound="> 0 and < 3.4e38"),
    "optim.reference_batch": Rule(bound=">= 1"),
    "optim.momentum": Rule(bound="in [0, 1)"),
    "optim.weight_decay": Rule(bound=">= 0"),
    "optim.label_smoothing": Rule(bound="in [0, 1)"),
    "optim.clip_grad": Rule(float, "> 0", none=True, example=5.0),
    "schedule.epochs": Rule(bound=">= 1"),
    "schedule.warmup_epochs": Rule(bound=">= 0"),
    "schedule.warmup_factor": Rule(float, "in (0, 1]", none=True, example=0.1),
    "schedule.milestones": Rule(list, example=[80, 120], expected="a list of epochs"),
    "schedule.gamma": Rule(bound="in (0, 1]"),
    "train.batch_size": Rule(bound=">= 1"),
    "train.amp": Rule(choices=("off", "bf16", "fp16"), example="bf16"),
    "train.ema_decay": Rule(bound="in (0, 1)"),
    "train.log_period": Rule(bound=">= 1"),
    "train.checkpoint_period": Rule(bound=">= 0"),
    "train.eval_period": Rule(bound=">= 1"),
    "train.precise_bn": Rule(bound=">= 0"),
    "train.divergence_factor": Rule(bound="> 0"),
    "train.divergence_margin": Rule(bound=">= 0"),
    "train.divergence_patience": Rule(bound=">= 1"),
    "train.divergence_max_weight": Rule(bound=">= 0"),
    "train.resume": Rule((bool, str), example=False, expected="true, false or a checkpoint path"),
    "weights": Rule(str, none=True, example="output/cls/my_run/best.pth"),
    "eval.batch_size": Rule(bound=">= 1"),
}


def _leaves(tree: dict, where: str = ""):
    for key, value in tree.items():
        path = where + key
        if isinstance(value, dict) and path not in _FREE_FORM:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _schema() -> dict[str, Rule]:
    schema = {}
    for path, default in _leaves(DEFAULTS):
        rule = _RULES.get(path, Rule())
        if rule.kind is None and default is None and not rule.choices:
            raise AssertionError(f"config key {path}: a None default needs a Rule with its type")
        schema[path] = rule._replace(
            kind=rule.kind or (str if rule.choices else type(default)),
            example=default if rule.example is None else rule.example,
        )
    stray = set(_RULES) - set(schema)
    if stray:
        raise AssertionError(f"_RULES names keys that DEFAULTS lacks: {sorted(stray)}")
    return schema


SCHEMA: dict[str, Rule] = _schema()

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
            raise UserError(
                f"unknown config key {path!r}; valid keys here: {sorted(out)} "
                f"(see classification/config.py)"
            )
        if isinstance(out[key], dict) and path not in _FREE_FORM:
            if not isinstance(value, dict):
                raise UserError(f"config key {path!r} is a section; give a mapping, not {value!r}")
            out[key] = merge(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Loader(yaml.SafeLoader):
    """A safe loader with YAML 1.2 scalars: ``1e-4`` is a number, only true/false are booleans.

    PyYAML follows YAML 1.1, where ``1e-4`` and ``1e6`` are strings (a float needs a dot) and
    ``off``, ``no``, ``on`` are booleans: ``optim.lr=1e6`` reached the trainer as text and
    ``train.amp=off`` as False. Python tags stay refused (SafeLoader's constructors).
    """


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag.endswith((":null", ":merge"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?(?:0|[1-9][0-9]*)", "-+0123456789"),
    (
        "float",
        r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        "-+0123456789.",
    ),
):
    _Loader.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_regexp})$"), list(_first)
    )


def _safe_load(stream):
    """One YAML document through ``_Loader`` (a SafeLoader: python tags are refused)."""
    loader = _Loader(stream)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml(path: str) -> dict:
    if not os.path.isfile(path):
        raise UserError(
            f"config file {path!r} does not exist; recipes live in {CONFIG_DIR}/ "
            f"({', '.join(list_recipes()) or 'none found'})"
        )
    with open(path, encoding="utf-8") as f:
        try:
            data = _safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"config file {path!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must hold a mapping at the top level")
    return data


def list_recipes() -> list[str]:
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith((".yaml", ".yml")))


def parse_override(item: str) -> dict:
    """``"optim.lr=0.05"`` -> ``{"optim": {"lr": 0.05}}`` (value parsed as a YAML scalar).

    A name or a path is taken as typed (``name=2024``, ``data.root=/data/[x]``), not as YAML.
    """
    if "=" not in item:
        raise UserError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.05)")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = _safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise UserError(
            f"override {item!r}: cannot parse value {raw!r}: {' '.join(str(e).split())}"
        ) from None
    rule = SCHEMA.get(key)
    if rule and rule.kind is str and not rule.choices and value is not None:
        value = value if isinstance(value, str) else raw
    out: dict = {}
    node = out
    parts = key.split(".")
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
    data_root = _lookup(flags, "data.root", _lookup(recipe, "data.root", None))
    if not config_file and data_root is None:
        cfg = merge(cfg, FASHION_MNIST_PROFILE)
    cfg = merge(cfg, recipe)
    # Another model (--model, or a model.name= override) drops the recipe's (or the embedded
    # demo's) model keywords: RandWire's generator, width and stem mean nothing to Conv4.
    name = (flags.get("model") or {}).get("name")
    for item in overrides or []:
        if item.split("=", 1)[0].strip() == "model.name":
            name = parse_override(item)["model"]["name"]
    if name is not None and name != cfg["model"]["name"]:
        cfg["model"] = copy.deepcopy(DEFAULTS["model"])
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

    def origin(path, value):
        found = _lookup(recipe, path, _MISSING)
        return f" in {config_file}" if found is not _MISSING and found == value else ""

    return finalize(check(cfg, origin))


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


_MISSING = object()


def _lookup(tree, path: str, default):
    """``tree["a"]["b"]`` for ``"a.b"``, or ``default`` where a part is missing."""
    for part in path.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def check(cfg: dict, origin=None) -> dict:
    """Check every value of a merged config against its key's ``SCHEMA`` rule, in place.

    Run once, after every source is merged, so a recipe, a flag and an override meet the same
    rule and a bad value stops the run before anything is built or written. Numbers are
    normalised (``1e3`` -> 1000 for an integer key, 1 -> 1.0 for a float key).
    ``origin(path, value)`` may name where a bad value came from (the recipe file).
    """
    for path, rule in SCHEMA.items():
        *sections, key = path.split(".")
        node = cfg
        for section in sections:
            node = node[section]
        node[key] = _checked(path, node[key], rule, origin)
        if rule.kind is dict and path == "model.gen_params":
            number = Rule(_NUMBER, example=0.75)
            for name, value in node[key].items():
                _checked(f"{path}.{name}", value, number, origin)
    return cfg


def _checked(path: str, value, rule: Rule, origin=None):
    good = _normalised(value, rule)
    if good is not _MISSING:
        return good
    where = origin(path, value) if origin else ""
    raise UserError(
        f"config key {path}={value!r}{where}: expected {_expected(rule)} "
        f"(e.g. {path}={_as_text(rule.example)})"
    )


def _normalised(value, rule: Rule):
    """``value`` as the rule's type, or _MISSING when the rule does not accept it."""
    kinds = rule.kind if isinstance(rule.kind, tuple) else (rule.kind,)
    if value is None:
        return None if rule.none else _MISSING
    if isinstance(value, bool):  # an int to Python, never a number here
        return value if bool in kinds else _MISSING
    if isinstance(value, (int, float)) and (int in kinds or float in kinds):
        try:
            if float in kinds and int not in kinds:
                value = float(value)
            elif int in kinds and float not in kinds:
                value = int(value) if value == int(value) else _MISSING
        except (OverflowError, ValueError):  # inf, nan, or an int too large for a float
            return _MISSING
        if value is _MISSING or (isinstance(value, float) and not math.isfinite(value)):
            return _MISSING
        return value if not rule.bound or _BOUNDS[rule.bound](value) else _MISSING
    if not isinstance(value, kinds) or (rule.choices and value not in rule.choices):
        return _MISSING
    return value


def _expected(rule: Rule) -> str:
    if rule.expected:
        text = rule.expected
    elif rule.choices:
        text = "one of " + ", ".join(map(repr, rule.choices))
    elif rule.kind is bool:
        text = "true or false"
    elif rule.kind in (int, float, _NUMBER):
        text = ("an integer" if rule.kind is int else "a number") + f" {rule.bound}".rstrip()
    else:
        text = {str: "a string", dict: "a mapping"}[rule.kind]
    return text + (" or null" if rule.none else "")


def _as_text(value) -> str:
    """A value as typed on the command line (YAML spelling)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def finalize(cfg: dict) -> dict:
    """Fill derived values (data name, run name, output dir) and check cross-key rules."""
    data = cfg["data"]
    prefixed = _PREFIXED_ROOT.match(data["root"] or "")
    if prefixed:
        name, data["root"] = prefixed.groups()
        if data["name"] not in ("auto", name):
            raise UserError(
                f"data.root names {name!r} but data.name={data['name']!r}; drop one of them"
            )
        data["name"] = name
    if data["name"] == "auto":
        data["name"] = "fashion_mnist" if data["root"] is None else "imagenet"
    if data["name"] in ("cifar10", "cifar100") and not data["root"]:
        raise UserError(
            f"data.name={data['name']} needs the folder of its python batches; pass "
            f"--data {data['name']}:ROOT (the root torchvision's CIFAR10(root) takes)"
        )
    if data["name"] == "imagenet" and not data["root"]:
        raise UserError(
            "this recipe trains on a folder in ImageNet layout but no data root was given; "
            "pass --data ROOT (ROOT/train/<class>/*, ROOT/val/<class>/*)"
        )
    stones, epochs = cfg["schedule"]["milestones"], cfg["schedule"]["epochs"]
    number = (int, float)
    bad = [m for m in stones if isinstance(m, bool) or not isinstance(m, number) or m <= 0]
    if bad or stones != sorted(set(stones)) or (stones and stones[-1] >= epochs):
        raise UserError(
            f"config key schedule.milestones={stones!r}: expected increasing epochs between 0 "
            f"and schedule.epochs={epochs}; with --epochs {epochs}, e.g. schedule.milestones="
            f"[{epochs * 0.5:g}, {epochs * 0.75:g}] (half and three quarters, as DNW's 80/120 of "
            "160), or schedule.milestones=[] for the cosine"
        )
    if cfg["eval"]["only"] and not cfg["weights"]:
        raise UserError("--eval-only needs --weights PATH (a checkpoint written by train_cls.py)")
    if cfg["name"] is None:
        cfg["name"] = run_name(cfg)
    if cfg["output_dir"] is None:
        cfg["output_dir"] = os.path.join("output", "cls", cfg["name"])
    return cfg


def _name_part(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "", text)


def run_name(cfg: dict) -> str:
    """The default run folder name: everything that makes one model or dataset differ from
    another (data and its root, model, wiring, generator and parameters, width, nodes, node op,
    model keywords, graph seed), so two different runs never share a folder (and so never
    resume each other) unless ``--name``/``--output-dir`` says so. Training settings (epochs,
    lr) are not in it: a changed setting continues the run, as a changed ``schedule.epochs``
    should. A name longer than 120 characters keeps its readable start and a hash of the rest.
    """
    m, data = cfg["model"], cfg["data"]
    parts = [data["name"]]
    root = data.get("root")
    if root and data["name"] != "fashion_mnist":
        base = os.path.basename(os.path.normpath(str(root)))
        if base and base != data["name"]:
            parts[0] += f"-{_name_part(base)}"
    parts.append(m["name"])
    if m["wiring"] not in (None, "static"):
        parts.append(m["wiring"])
    if m["gen"]:
        params = "".join(f"-{k}{v}" for k, v in sorted(m["gen_params"].items()))
        parts.append(f"{m['gen']}{params}")
    for key, prefix in (("channels", "c"), ("nodes", "n"), ("node_op", "")):
        if m[key] is not None:
            parts.append(f"{prefix}{_name_part(m[key])}")
    parts += [f"{_name_part(k)}-{_name_part(v)}" for k, v in sorted(m["kwargs"].items())]
    if m["seed"] is not None:
        parts.append(f"seed{m['seed']}")
    name = "_".join(parts)
    if len(name) > 120:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[:100]}_{digest}"
    return name


def to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)
