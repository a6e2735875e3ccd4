"""Study specs (configs/studies/*.yaml): a grid of training runs, expanded into one
``tools/train_cls.py`` recipe per run.

A spec holds (every key checked; an unknown or bad one is one line naming it):

- ``name``, ``reproduces`` (free text for the docs and the table), ``data`` (``fashion_mnist``,
  ``cifar10``, ``cifar100``; ``--data NAME:ROOT`` on the command line replaces it).
- ``config``: train_cls config keys shared by every run (classification/defaults.py; checked
  by classification/config.py's SCHEMA).
- ``grid``: axes shared by every group, each a list of values; ``groups``: named run groups,
  each with its own ``grid`` (on top of the shared one; ``axis: null`` drops a shared axis),
  ``config``, ``label`` and ``baseline: true`` for a learned-dense reference drawn as a line.
- ``figures``: what the aggregation draws (``rwdet.analysis.study``): ``kind`` line or bar,
  ``x``, ``series`` (an axis, ``group``, or a list of them), ``panel``, ``groups``,
  ``baselines``, ``title``, ``paper``.
- ``presets``: named overrides (``quick``): ``data``, ``config`` (merged), ``grid`` (axes
  replaced), ``groups: {NAME: {grid, config}}``, ``skip_groups``, ``note``.

Axes (``AXES``) are the settings a study varies; each maps to one config key (the axes ``k``
and ``fixed_k`` keep the paper's name for the fraction kept; the models' keyword is ``keep``).
``fixed_k`` is Figure 5's: the fraction kept at width 1, turned into ``keep`` at each width so
that the number of kept weights stays that of width 1 (edge-popup §4.3, "c1, c2, c3 ...
coincide with # of Parameters for k = [30, 50, 70] for width multiplier 1").
"""

from __future__ import annotations

import copy
import itertools
import os
import re

from classification import config as cfg_lib
from rwdet.run.errors import UserError

# Axis -> the config key it sets.
AXES = {
    "model": "model.name",
    "wiring": "model.wiring",
    "k": "model.kwargs.keep",
    "fixed_k": "model.kwargs.keep",
    "width": "model.kwargs.width",
    "init": "model.kwargs.init",
    "scale": "model.kwargs.scale",
    "seed": "seed",
    "lr": "optim.lr",
}
# The order of axes in run names and tables.
AXIS_ORDER = ("model", "wiring", "width", "k", "fixed_k", "init", "scale", "lr", "seed")
DATA_NAMES = ("fashion_mnist", "cifar10", "cifar100")
TOP_KEYS = {"name", "reproduces", "data", "config", "grid", "groups", "figures", "presets"}
GROUP_KEYS = {"name", "grid", "config", "baseline", "label"}
PRESET_KEYS = {"data", "config", "grid", "groups", "skip_groups", "note"}
FIGURE_KEYS = {"name", "kind", "x", "series", "panel", "groups", "baselines", "title", "paper"}
FIGURE_KINDS = ("line", "bar")
# Per dataset: what every run of a study needs that the trainer's defaults (ImageNet) lack.
DATA_CONFIG = {
    "fashion_mnist": {"data": {"name": "fashion_mnist"}},
    "cifar10": {"data": {"name": "cifar10"}},
    "cifar100": {"data": {"name": "cifar100"}},
}


class SpecError(UserError):
    """A bad study spec: one line naming the file and the key."""


def _err(path: str, key: str, text: str) -> SpecError:
    return SpecError(f"study spec {path}: {key}: {text}")


def load_spec(path: str) -> dict:
    """The spec as written (checked for shape only; ``resolve_spec`` applies a preset)."""
    if not os.path.isfile(path):
        raise UserError(f"study spec {path!r} does not exist; specs live in configs/studies/")
    spec = cfg_lib.load_yaml(path)
    _check_keys(path, "top level", spec, TOP_KEYS)
    for key in ("name", "groups", "figures"):
        if key not in spec:
            raise _err(path, key, "missing (see configs/studies/popup_k_sweep.yaml)")
    if not isinstance(spec["name"], str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", spec["name"]):
        raise _err(path, "name", f"{spec['name']!r} must be a plain folder name")
    return spec


def _check_keys(path: str, where: str, node, allowed: set) -> None:
    if not isinstance(node, dict):
        raise _err(path, where, f"expected a mapping, got {node!r}")
    unknown = sorted(set(node) - allowed)
    if unknown:
        raise _err(path, f"{where}.{unknown[0]}" if where != "top level" else unknown[0],
                   f"unknown key; valid keys here: {sorted(allowed)}")  # fmt: skip


def _check_grid(path: str, where: str, grid) -> dict:
    """The grid's axes; ``axis: null`` (kept as None) drops a shared axis from a group."""
    _check_keys(path, where, grid or {}, set(AXES))
    out = {}
    for axis, values in (grid or {}).items():
        if values is None and where != "grid":
            out[axis] = None
            continue
        if not isinstance(values, list) or not values:
            raise _err(path, f"{where}.{axis}", f"expected a non-empty list, got {values!r}")
        for v in values:
            if isinstance(v, (dict, list)):
                raise _err(path, f"{where}.{axis}", f"values must be scalars, got {v!r}")
            if axis in ("k", "fixed_k") and not (isinstance(v, (int, float)) and 0 < v <= 1):
                raise _err(path, f"{where}.{axis}", f"{v!r} is not a fraction in (0, 1]")
            if axis == "width" and not (isinstance(v, (int, float)) and v > 0):
                raise _err(path, f"{where}.{axis}", f"{v!r} is not a positive multiplier")
        out[axis] = list(values)
    if out.get("k") is not None and out.get("fixed_k") is not None:
        raise _err(path, where, "give k or fixed_k, not both")
    return out


def resolve_spec(path: str, preset: str | None = None, data: str | None = None) -> dict:
    """The spec with ``preset`` applied and every part checked."""
    spec = load_spec(path)
    presets = spec.get("presets") or {}
    _check_keys(path, "presets", presets, set(presets))
    if preset is not None and preset not in presets:
        raise UserError(
            f"study spec {path}: no preset {preset!r}; presets: {sorted(presets) or 'none'}"
        )
    groups_in = spec["groups"]
    if not isinstance(groups_in, list) or not groups_in:
        raise _err(path, "groups", "expected a non-empty list of groups")
    names = [g.get("name") if isinstance(g, dict) else None for g in groups_in]
    for name, each in presets.items():  # every preset, so a typo shows before it is used
        _check_preset(path, name, each, names)
    p = presets.get(preset) or {}
    out = {
        "name": spec["name"],
        "reproduces": str(spec.get("reproduces", "")),
        "preset": preset,
        "note": str(p.get("note", "")),
        "data": p.get("data", spec.get("data", "fashion_mnist")),
    }
    base: dict = {}
    for where, extra in (
        ("config", spec.get("config")),
        (f"presets.{preset}.config", p.get("config")),
    ):
        if extra is not None and not isinstance(extra, dict):
            raise _err(path, where, f"expected a mapping of config keys, got {extra!r}")
        base = _deep_merge(base, extra or {})
    out["config"] = base
    data_root = None
    if data:
        m = re.fullmatch(r"(fashion_mnist|cifar10|cifar100)(?::(.+))?", data)
        if not m:
            raise UserError(
                f"--data {data!r}: expected fashion_mnist[:DIR], cifar10:ROOT or cifar100:ROOT"
            )
        out["data"], data_root = m.groups()
    if out["data"] not in DATA_NAMES:
        raise _err(path, "data", f"{out['data']!r} is not one of {DATA_NAMES}")
    out["data_root"] = data_root
    shared = _check_grid(path, "grid", spec.get("grid"))
    shared.update(_check_grid(path, f"presets.{preset}.grid", p.get("grid")))
    shared = {axis: values for axis, values in shared.items() if values is not None}
    preset_groups = p.get("groups") or {}
    skip = p.get("skip_groups") or []
    groups = []
    for i, g in enumerate(groups_in):
        where = f"groups[{i}]"
        _check_keys(path, where, g, GROUP_KEYS)
        name = g.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise _err(path, f"{where}.name", f"{name!r} must be a plain name ([A-Za-z0-9_-])")
        if names.count(name) > 1:
            raise _err(path, f"{where}.name", f"{name!r} is used by two groups")
        grid = dict(shared)
        grid.update(_check_grid(path, f"{where}.grid", g.get("grid")))
        over = preset_groups.get(name) or {}
        grid.update(_check_grid(path, f"presets.{preset}.groups.{name}.grid", over.get("grid")))
        grid = {axis: values for axis, values in grid.items() if values is not None}
        if "k" in grid and "fixed_k" in grid:
            raise _err(path, f"{where}.grid", "k and fixed_k both set (one from the shared grid)")
        for key in ("model", "seed"):
            if key not in grid:
                raise _err(path, f"{where}.grid.{key}", "missing (every run needs one)")
        config = _deep_merge(g.get("config") or {}, over.get("config") or {})
        baseline = g.get("baseline", False)
        if not isinstance(baseline, bool):
            raise _err(path, f"{where}.baseline", f"expected true or false, got {baseline!r}")
        label = g.get("label", name)
        if name in skip:
            continue
        groups.append(
            {
                "name": name,
                "grid": grid,
                "config": config,
                "baseline": baseline,
                "label": str(label),
            }
        )
    out["groups"] = groups
    out["figures"] = _check_figures(path, spec["figures"], [g["name"] for g in groups_in])
    return out


def _check_preset(path: str, name: str, p, group_names: list) -> None:
    where = f"presets.{name}"
    _check_keys(path, where, p, PRESET_KEYS)
    if p.get("data") is not None and p["data"] not in DATA_NAMES:
        raise _err(path, f"{where}.data", f"{p['data']!r} is not one of {DATA_NAMES}")
    if p.get("config") is not None and not isinstance(p["config"], dict):
        raise _err(path, f"{where}.config", "expected a mapping of config keys")
    _check_grid(path, f"{where}.grid", p.get("grid"))
    groups = p.get("groups") or {}
    _check_keys(path, f"{where}.groups", groups, {n for n in group_names if n})
    for group, over in groups.items():
        _check_keys(path, f"{where}.groups.{group}", over, {"grid", "config"})
        _check_grid(path, f"{where}.groups.{group}.grid", over.get("grid"))
        if over.get("config") is not None and not isinstance(over["config"], dict):
            raise _err(path, f"{where}.groups.{group}.config", "expected a mapping")
    skip = p.get("skip_groups") or []
    if not isinstance(skip, list):
        raise _err(path, f"{where}.skip_groups", "expected a list of group names")
    unknown = [s for s in skip if s not in group_names]
    if unknown:
        raise _err(path, f"{where}.skip_groups", f"no group named {unknown[0]!r}")


def _check_figures(path: str, figures, group_names: list) -> list:
    if not isinstance(figures, list):
        raise _err(path, "figures", "expected a list of figures")
    out = []
    axes_ok = set(AXES) | {"group"}
    for i, f in enumerate(figures):
        where = f"figures[{i}]"
        _check_keys(path, where, f, FIGURE_KEYS)
        for key in ("name", "x"):
            if key not in f:
                raise _err(path, f"{where}.{key}", "missing")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(f["name"])):
            raise _err(path, f"{where}.name", f"{f['name']!r} must be a plain file name")
        kind = f.get("kind", "line")
        if kind not in FIGURE_KINDS:
            raise _err(path, f"{where}.kind", f"{kind!r} is not one of {FIGURE_KINDS}")
        for key in ("x", "series", "panel"):
            value = f.get(key)
            many = value if key == "series" and isinstance(value, list) else [value]
            for v in many:
                if v is not None and (not isinstance(v, str) or v not in axes_ok):
                    raise _err(path, f"{where}.{key}", f"{v!r} is not one of {sorted(axes_ok)}")
        for key in ("groups", "baselines"):
            for g in f.get(key) or []:
                if g not in group_names:
                    raise _err(path, f"{where}.{key}", f"no group named {g!r}")
        out.append({"kind": kind, "series": "group", "panel": None, "groups": None,
                    "baselines": [], "title": "", "paper": "", **f})  # fmt: skip
    return out


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _value_text(v) -> str:
    if isinstance(v, float):
        v = f"{v:g}"
    return re.sub(r"[^A-Za-z0-9_.+-]+", "", str(v))


def run_name(group: str, axes: dict) -> str:
    """The folder name of one run: its group and every axis value it was given (a wiring
    equal to the group's name and an unscaled init are left out)."""
    parts = [group]
    for axis in AXIS_ORDER:
        if axis not in axes or (axis == "wiring" and axes[axis] == group):
            continue
        value = axes[axis]
        if axis == "scale":
            if value:
                parts.append("scaled")
            continue
        prefix = {"width": "w", "k": "k", "fixed_k": "fixedk", "lr": "lr", "seed": "seed"}
        parts.append(prefix.get(axis, "") + _value_text(value))
    return "_".join(parts)


def kept_weights(model: str, width: float, in_channels: int, num_classes: int) -> int:
    """Weights a popup model chooses among at ``width``: every multi-dimensional parameter of
    its dense twin (conv kernels and linear matrices; biases are never chosen)."""
    from rwdet.models import build_model

    net = build_model(
        model, wiring="dense", width=width, in_channels=in_channels, num_classes=num_classes
    )
    return sum(p.numel() for p in net.parameters() if p.ndim > 1)


def expand(spec: dict, out_dir: str) -> list[dict]:
    """Every run of a resolved spec: ``{"name", "group", "baseline", "axes", "dir", "recipe"}``.

    ``recipe`` is the train_cls config of the run (checked against the trainer's schema here,
    so a bad key stops the study before any run starts).
    """
    data = spec["data"]
    in_ch, n_cls = (1, 10) if data == "fashion_mnist" else (3, 100 if data == "cifar100" else 10)
    base = _deep_merge(DATA_CONFIG[data], spec["config"])
    if spec["data_root"]:  # fashion_mnist:DIR names the folder of its idx files
        key = "data.fashion_mnist_dir" if data == "fashion_mnist" else "data.root"
        _set(base, key, spec["data_root"])
    runs, seen = [], {}
    size_cache: dict = {}
    for group in spec["groups"]:
        grid = group["grid"]
        axes_names = [a for a in AXIS_ORDER if a in grid]
        for values in itertools.product(*(grid[a] for a in axes_names)):
            axes = dict(zip(axes_names, values))
            recipe = _deep_merge(base, group["config"])
            for axis, value in axes.items():
                _set(recipe, AXES[axis], value)
            if "fixed_k" in axes:
                width = axes.get("width", 1.0)
                key = (axes["model"], width)
                for w in (1.0, width):
                    if (axes["model"], w) not in size_cache:
                        size_cache[(axes["model"], w)] = kept_weights(
                            axes["model"], w, in_ch, n_cls
                        )
                k = axes["fixed_k"] * size_cache[(axes["model"], 1.0)] / size_cache[key]
                if k > 1:
                    raise UserError(
                        f"study {spec['name']}: fixed_k={axes['fixed_k']} at width {width} needs "
                        f"k={k:.3g} > 1 (the narrower net has fewer weights); drop that width"
                    )
                _set(recipe, "model.kwargs.keep", round(k, 6))
            name = run_name(group["name"], axes)
            if name in seen:
                raise UserError(
                    f"study {spec['name']}: groups {seen[name]!r} and {group['name']!r} both "
                    f"make run {name!r}; give the groups different names or values"
                )
            seen[name] = group["name"]
            run_dir = os.path.join(out_dir, "runs", name)
            recipe["output_dir"] = run_dir
            recipe["name"] = name
            _check_recipe(spec, group["name"], recipe)
            runs.append(
                {"name": name, "group": group["name"], "label": group["label"],
                 "baseline": group["baseline"], "axes": axes, "dir": run_dir, "recipe": recipe}
            )  # fmt: skip
    return runs


def _check_recipe(spec: dict, group: str, recipe: dict) -> None:
    try:
        cfg_lib.finalize(cfg_lib.check(cfg_lib.merge(cfg_lib.DEFAULTS, recipe)))
    except UserError as e:
        raise UserError(f"study {spec['name']}, group {group}: {e}") from None


def epochs_of(recipe: dict) -> int:
    return int(cfg_lib.merge(cfg_lib.DEFAULTS, recipe)["schedule"]["epochs"])
