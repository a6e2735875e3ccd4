"""Training configuration: commented ``CfgNode`` defaults, YAML recipes, command-line overrides.

Resolution order (later wins): the defaults (``classification/defaults.py``, one comment per
key) -> the Fashion-MNIST profile (only when neither a config file nor ``--data`` is given, so
that ``train_cls.py --gen ws`` is a small CPU run) -> ``--config FILE`` (and the ``_BASE_``
files it names) -> flags such as ``--epochs`` -> ``KEY VALUE`` overrides after the flags, as
detectron2's ``opts`` (``optim.lr 0.05 model.kwargs.dropout 0.1``). ``resolve`` returns a frozen
fvcore ``CfgNode``: item access (``cfg["optim"]["lr"]``) and attribute access
(``cfg.optim.lr``) both work.

Design decisions (rwdet issue #15, item 3):

- Keys stay lower case (``optim.lr``): fvcore's ``CfgNode`` does not require upper case, and
  every recipe, study spec and command line written so far keeps working.
- The ``CfgNode`` is the container and the declaration of the keys, not the merger.
  ``merge_from_file`` falls back to ``yaml.unsafe_load`` on an unknown tag when
  ``allow_unsafe`` (detectron2's default) and otherwise reads YAML 1.1 (``1e-4`` a string,
  ``off`` False); yacs's ``merge_from_list`` reads values with ``ast.literal_eval``. Neither is
  called: recipes (and their ``_BASE_`` chain, resolved as fvcore does) and override values
  are read by ``_Loader``, a ``SafeLoader`` with YAML 1.2 scalars; nothing runs as code.
- yacs's type coercion (a float key refuses ``1``, a None default takes anything) is not used:
  ``SCHEMA`` (one rule per key) stays the single place that checks values, once every source
  is merged, so a bad value is one line naming the key, the value and a fix.
- Unknown keys are errors naming the closest valid key, so a typo cannot silently do nothing.
- The free-form sections (``model.gen_params``, ``model.kwargs``: ``new_allowed`` in the
  defaults) hold plain dicts in the resolved config: they are passed to ``build_model`` as
  they are and end up in checkpoints, which ``torch.load(weights_only=True)`` must read.
  For the same reason a checkpoint stores ``to_dict(cfg)``, never the ``CfgNode``.
- The old ``key=value`` override form still works; ``tools/train_cls.py`` prints one
  deprecation line naming the ``KEY VALUE`` form to type (``split_overrides``).
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
import os
import re
import shlex
import textwrap
from typing import NamedTuple

import yaml
from fvcore.common.config import BASE_KEY, CfgNode

from classification.defaults import (
    FASHION_MNIST_DIR,  # noqa: F401  (re-exported: tools/export.py reads it from here)
    free_form_sections,
    get_defaults,
    key_comments,
)
from rwdet.models.args import GEN_CHOICES, NODE_OP_CHOICES  # live registry views
from rwdet.run.errors import UserError

DATA_NAMES = ("auto", "imagenet", "fashion_mnist", "cifar10", "cifar100")
# data.root given as NAME:PATH names the dataset (--data cifar10:/data/cifar).
_PREFIXED_ROOT = re.compile(r"^(imagenet|cifar10|cifar100):(.+)$")


def to_dict(cfg) -> dict:
    """``cfg`` as plain nested dicts and lists: what YAML dumps, JSON and checkpoints hold
    (``torch.load(weights_only=True)`` cannot rebuild a ``CfgNode``)."""
    if isinstance(cfg, dict):
        return {key: to_dict(value) for key, value in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(value) for value in cfg]
    return cfg


# The defaults as plain nested dicts (the merge below works on these).
DEFAULTS: dict = to_dict(get_defaults())

# ---------------------------------------------------------------------------- value rules

# Sections whose keys are not fixed (new_allowed in the defaults): they pass through to the
# model (and a mapping given for the section replaces it whole).
_FREE_FORM = free_form_sections()


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
            close = difflib.get_close_matches(str(key), [str(k) for k in out], n=1)
            hint = f" (did you mean {where + close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown config key {path!r}{hint}; valid keys here: {sorted(out)} "
                f"(see classification/defaults.py)"
            )
        if isinstance(out[key], dict) and path not in _FREE_FORM:
            if not isinstance(value, dict):
                first = next(iter(out[key]))
                raise UserError(
                    f"config key {path!r} is a section; give a mapping, not {value!r} "
                    f"(or set one of its keys, e.g. {path}.{first} VALUE)"
                )
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


class _Dumper(yaml.SafeDumper):
    """A safe dumper that quotes strings ``_Loader`` or PyYAML's YAML 1.1 would not read back
    as strings."""


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
    # The dumper knows both readings, so it quotes a string that either would take for a
    # number or a boolean ("1e5", "off"): config.yaml reads back the same with any loader.
    _Dumper.add_implicit_resolver(
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
    """One YAML file through the safe loader; it must hold a mapping (or nothing)."""
    if not os.path.isfile(path):
        raise UserError(
            f"config file {path!r} does not exist; recipes live in {CONFIG_DIR}/ "
            f"({', '.join(list_recipes()) or 'none found'})"
        )
    with open(path, encoding="utf-8") as f:
        try:
            data = _safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(
                f"config file {path!r} is not valid YAML: {' '.join(str(e).split())}"
            ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path!r} must hold a mapping at the top level")
    return data


def load_recipe(path: str, _seen: tuple[str, ...] = ()) -> dict:
    """A recipe with its ``_BASE_`` chain merged under it (fvcore's rule: a base path is
    relative to the file that names it; later files win, a mapping given for a free-form
    section replaces it whole). Every file goes through the safe loader."""
    real = os.path.realpath(path)
    if real in _seen:
        raise UserError(
            f"config file {path!r} names itself in its {BASE_KEY} chain; remove the loop"
        )
    data = load_yaml(path)
    bases = data.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(
            f"config file {path!r}: {BASE_KEY} must be a file name or a list of them, not {bases!r}"
        )
    out: dict = {}
    for base in bases:
        base = os.path.expanduser(base)
        if not os.path.isabs(base):
            base = os.path.join(os.path.dirname(path), base)
        out = _merge_recipes(out, load_recipe(base, (*_seen, real)))
    return _merge_recipes(out, data)


def _merge_recipes(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{where}{key}"
        if isinstance(value, dict) and isinstance(out.get(key), dict) and path not in _FREE_FORM:
            out[key] = _merge_recipes(out[key], value, path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def list_recipes() -> list[str]:
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith((".yaml", ".yml")))


# ---------------------------------------------------------------------------- overrides

# A config key as typed before "=" in the deprecated form (letters, digits, _ and dots).
_OLD_FORM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*=(.*)$", re.S)


class Override(NamedTuple):
    """One override: the dotted key and its value as typed (parsed by ``parse_override``)."""

    key: str
    raw: str


def split_overrides(tokens: list[str] | None) -> tuple[list[Override], list[str]]:
    """The command line's trailing tokens as ``KEY VALUE`` pairs, and the tokens written in
    the deprecated ``key=value`` form (accepted, for the caller to warn about).

    A token in a key's place is a ``key=value`` item when it starts with a dotted name and
    "="; a token in a value's place is always the value, "=" or not (``name a=b``).
    """
    pairs: list[Override] = []
    old: list[str] = []
    tokens = list(tokens or [])
    i = 0
    while i < len(tokens):
        token = tokens[i]
        match = _OLD_FORM.match(token)
        if match:
            pairs.append(Override(match.group(1), match.group(2)))
            old.append(token)
            i += 1
            continue
        if i + 1 == len(tokens):
            raise UserError(_dangling(pairs, token))
        pairs.append(Override(token.strip(), tokens[i + 1]))
        i += 2
    return pairs, old


def _dangling(pairs: list[Override], last: str) -> str:
    """The error for an odd token count, naming the key that most likely lost its value: a
    pair whose value is itself a config key (``optim.lr train.ema true``), else the last."""
    key = next((k for k, raw in pairs if raw in SCHEMA), last)
    rule = SCHEMA.get(key)
    example = _as_command(key, rule.example) if rule else f"{key} VALUE"
    return f"config overrides come in KEY VALUE pairs; {key!r} has no value (e.g. {example})"


def deprecation_note(old: list[str]) -> str:
    """The one line telling a user of ``key=value`` overrides what to type instead."""
    pairs, _ = split_overrides(old)
    new = " ".join(f"{key} {shlex.quote(raw)}" for key, raw in pairs)
    return (
        f"note: key=value overrides are deprecated and will be removed; type KEY VALUE "
        f"pairs instead: {new}"
    )


def _as_command(key: str, value) -> str:
    """``key value`` as typed in a shell (the value quoted where the shell would split it)."""
    return f"{key} {shlex.quote(_as_text(value))}"


def parse_override(key: str, raw: str) -> dict:
    """``("optim.lr", "0.05")`` -> ``{"optim": {"lr": 0.05}}`` (the value read as YAML by
    the safe loader: a number, a list, a mapping, null; a python tag is refused).

    A name or a path is taken as typed (``name 2024``, ``data.root /data/[x]``), not as YAML.
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*", key):
        raise UserError(
            f"override key {key!r} is not a dotted config key; overrides come in KEY VALUE "
            "pairs (e.g. optim.lr 0.05)"
        )
    try:
        value = _safe_load(raw) if raw != "" else None
    except yaml.YAMLError as e:
        raise UserError(
            f"override {key} {raw!r}: cannot parse the value: {' '.join(str(e).split())} "
            f"(quote a value that holds spaces, e.g. {key} '{{a: 1, b: 2}}')"
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
) -> CfgNode:
    """The full config, frozen: defaults, profile, recipe, flags (a partial config dict),
    overrides (the command line's trailing tokens: ``KEY VALUE`` pairs, or ``key=value``)."""
    flags = copy.deepcopy(flags or {})
    pairs, _ = split_overrides(overrides)
    updates = [(key, parse_override(key, raw)) for key, raw in pairs]
    recipe = load_recipe(config_file) if config_file else {}
    cfg = copy.deepcopy(DEFAULTS)
    data_root = _lookup(flags, "data.root", _lookup(recipe, "data.root", None))
    if not config_file and data_root is None:
        cfg = merge(cfg, FASHION_MNIST_PROFILE)
    cfg = merge(cfg, recipe)
    # Another model (--model, or a model.name override) drops the recipe's (or the embedded
    # demo's) model keywords: RandWire's generator, width and stem mean nothing to Conv4.
    name = (flags.get("model") or {}).get("name")
    for key, update in updates:
        if key == "model.name":
            name = update["model"]["name"]
    if name is not None and name != cfg["model"]["name"]:
        cfg["model"] = copy.deepcopy(DEFAULTS["model"])
    # Another generator (--gen, or a model.gen override, the last one winning) drops the
    # recipe's parameters; the command line's own (--k/--p/--m, model.gen_params.*) stay.
    gen = (flags.get("model") or {}).get("gen")
    for key, update in updates:
        if key == "model.gen":
            gen = update["model"]["gen"]
    if gen is not None and gen != cfg["model"]["gen"]:
        cfg["model"]["gen_params"] = {}
    gen_params = (flags.get("model") or {}).pop("gen_params", None)
    cfg = merge(cfg, flags)
    if gen_params:
        cfg["model"]["gen_params"] = {**cfg["model"]["gen_params"], **gen_params}
    for key, update in updates:
        cfg = _apply(cfg, key, update)

    def origin(path, value):
        found = _lookup(recipe, path, _MISSING)
        return f" in {config_file}" if found is not _MISSING and found == value else ""

    return to_cfgnode(finalize(check(cfg, origin)))


def apply_override(cfg: dict, key: str, raw: str) -> dict:
    """One ``KEY VALUE`` override on a full config (a new dict; ``cfg`` is left alone).

    Inside a free-form section (``model.kwargs.dropout 0.3``) it sets that one key and keeps
    the section's others; ``model.kwargs '{...}'`` replaces the section whole.
    """
    return _apply(cfg, key, parse_override(key, raw))


def _apply(cfg: dict, key: str, update: dict) -> dict:
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
        f"(e.g. {_as_command(path, rule.example)})"
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
            f"and schedule.epochs={epochs}; with --epochs {epochs}, e.g. schedule.milestones "
            f"'[{epochs * 0.5:g}, {epochs * 0.75:g}]' (half and three quarters, as DNW's 80/120 "
            "of 160), or schedule.milestones '[]' for the cosine"
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
    # ``keep`` (the fraction kept) was ``k`` before #15: named so, runs started then resume.
    named = {("k" if k == "keep" else k): v for k, v in m["kwargs"].items()}
    parts += [f"{_name_part(k)}-{_name_part(v)}" for k, v in sorted(named.items())]
    if m["seed"] is not None:
        parts.append(f"seed{m['seed']}")
    name = "_".join(parts)
    if len(name) > 120:
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[:100]}_{digest}"
    return name


def to_cfgnode(cfg: dict) -> CfgNode:
    """A resolved config as a frozen ``CfgNode``; the free-form sections stay plain dicts
    (build_model keywords, stored as they are in checkpoints, and never type-checked by yacs,
    which knows only YAML's scalars and lists)."""
    fixed = copy.deepcopy(to_dict(cfg))
    for path in _FREE_FORM:
        *sections, key = path.split(".")
        parent = fixed
        for section in sections:
            parent = parent[section]
        parent[key] = {}
    node = CfgNode(fixed)
    for path in _FREE_FORM:
        *sections, key = path.split(".")
        parent = node
        for section in sections:
            parent = parent[section]
        dict.__setitem__(parent, key, to_dict(_lookup(cfg, path, {})))
    node.freeze()
    return node


def to_yaml(cfg, comments: bool = True) -> str:
    """The config as YAML that the recipe loader reads back unchanged; with ``comments``, each
    key is preceded by its comment from classification/defaults.py (as pycls's dump)."""
    plain = to_dict(cfg)
    if not comments:
        return yaml.dump(plain, Dumper=_Dumper, sort_keys=False, default_flow_style=False)
    notes = key_comments()
    lines: list[str] = []

    def emit(tree: dict, where: str, indent: str) -> None:
        for key, value in tree.items():
            path = where + str(key)
            for note in textwrap.wrap(notes.get(path, ""), 96 - len(indent)):
                lines.append(f"{indent}# {note}")
            if isinstance(value, dict) and value and path not in _FREE_FORM:
                lines.append(f"{indent}{key}:")
                emit(value, path + ".", indent + "  ")
            else:  # one flow-style line: "key: value"
                text = yaml.dump([value], Dumper=_Dumper, default_flow_style=True, width=math.inf)
                lines.append(f"{indent}{key}: {text.strip()[1:-1]}")

    emit(plain, "", "")
    return "\n".join(lines) + "\n"
