"""Detectron2 configs read without running code, and config mistakes as one line.

detectron2's ``CfgNode.merge_from_file`` falls back to ``yaml.unsafe_load`` when the safe
loader meets a tag it does not know, so ``!!python/object/apply:os.system [...]`` in a config
(or in any ``_BASE_`` it names) would run. Here every file of the ``_BASE_`` chain is first read
with ``yaml.safe_load`` and checked (a mapping, bases that exist); the merge itself then runs
with ``allow_unsafe=False``, so fvcore reads the chain with the safe loader too. detectron2's
own configs (model zoo) use no python tags and load unchanged.

Unknown keys and values of the wrong type (yacs raises ``KeyError``/``AssertionError``/
``ValueError``, sometimes with a dump of a whole config node) become a ``UserError`` naming the
key, the value and the fix.
"""

from __future__ import annotations

import os

import yaml
from fvcore.common.config import BASE_KEY

from rwdet.run.errors import UserError

KEYS_HINT = (
    "check the spelling (the keys are detectron2's, in detectron2/config/defaults.py, and "
    "rwdet's MODEL.RWDET.*, in rwdet/d2/config.py)"
)


def _where(mark, path: str) -> str:
    return f"{path!r} line {mark.line + 1}" if mark is not None else repr(path)


def read_config_chain(path: str, _seen: tuple[str, ...] = ()) -> list[str]:
    """Safe-load ``path`` and its ``_BASE_`` files; return the files read, bases first."""
    real = os.path.realpath(path)
    if real in _seen:
        raise UserError(f"config file {path!r} names itself in its _BASE_ chain; remove the loop")
    if not os.path.isfile(path):
        child = f" (the _BASE_ of {_seen[-1]!r})" if _seen else ""
        raise UserError(f"config file {path!r}{child} does not exist; check the path")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.constructor.ConstructorError as e:
        raise UserError(
            f"config file {_where(e.problem_mark, path)}: {e.problem}; configs are read with "
            "yaml.safe_load, which refuses python tags (they can run code): remove the tag"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(
            f"config file {_where(mark, path)} is not valid YAML ({problem}); fix the file"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path!r} is not UTF-8 text; pass a YAML config") from None
    if not isinstance(data, dict):
        raise UserError(
            f"config file {path!r} holds a {type(data).__name__}, not a mapping of config keys; "
            "pass a detectron2 YAML config"
        )
    bases = data.get(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"config file {path!r}: {BASE_KEY} must be a file name or a list of them")
    files = []
    for base in bases:
        base = os.path.expanduser(base)
        if not os.path.isabs(base):  # fvcore's rule: relative to the file that names it
            base = os.path.join(os.path.dirname(path), base)
        files += read_config_chain(base, (*_seen, real))
    return [*files, path]


def merge_config_file(cfg, path: str) -> None:
    """``cfg.merge_from_file(path)`` with safe YAML everywhere and one-line errors."""
    read_config_chain(path)
    try:
        cfg.merge_from_file(path, allow_unsafe=False)
    except KeyError as e:
        msg = e.args[0] if e.args else e
        raise UserError(f"config file {path!r} (or a _BASE_ of it): {msg}; {KEYS_HINT}") from None
    except (ValueError, AssertionError) as e:
        msg = " ".join(str(e).split())
        if len(msg) > 300:  # yacs may print a whole config node
            msg = msg[:300] + " ..."
        raise UserError(f"config file {path!r} (or a _BASE_ of it): {msg}") from None


def merge_config_opts(cfg, opts: list[str]) -> None:
    """``cfg.merge_from_list(opts)`` one pair at a time, so an error names its own key."""
    if len(opts) % 2:
        raise UserError(
            f"config overrides come in KEY VALUE pairs; {opts[-1]!r} has no value "
            "(e.g. SOLVER.BASE_LR 0.01)"
        )
    for key, value in zip(opts[0::2], opts[1::2]):
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"override {key}: no config key {'.'.join(parts[: i + 1])}; "
                                f"{KEYS_HINT}")  # fmt: skip
            node = node[part]
        if isinstance(node, dict):
            raise UserError(
                f"override {key}: a group of keys, not a value; set one of its keys, "
                f"e.g. {key}.{next(iter(node), 'KEY')} VALUE"
            )
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, AssertionError, KeyError):
            want = type(node).__name__
            how = f"pass a {want}"
            if isinstance(node, (list, tuple)):  # yacs reads them as Python literals
                example = repr(list(node)) if node else "['a', 'b']"
                how += f' as a Python literal, quoted for the shell, e.g. {key} "{example}"'
            raise UserError(
                f"override {key} {value!r}: expected a {want} (the current value is "
                f"{node!r}); {how}"
            ) from None
