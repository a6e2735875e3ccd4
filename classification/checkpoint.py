"""Checkpoints: the training state's schema, atomic writes, weights_only loads, RNG state,
architecture/graph checks.

A checkpoint is a ``torch.save``d dict of tensors and plain Python values (weights_only-safe):
"model" (plain state_dict), "model_spec" ({"name", "kwargs"}), "graphs" (edge lists,
``rwdet.graphs.graphs_to_dict``), "ema", "ema_updates", "optimizer", "scheduler", "scaler",
"epoch", "iteration", "rng", "sampler", "config", "metrics", "classes", "guard" (the divergence
guard's running loss level), "graphs_fingerprint" (of "graphs": every load checks the edge lists
against it with ``rwdet.models.verify.verify_graphs``, so an edited graph is refused). The
Detectron2 converter reads "model", "model_spec" and "graphs"; a model is rebuilt from them with
``build_model(spec["name"], graphs=graphs_from_dict(ckpt["graphs"]), **spec["kwargs"])``.
``TrainState`` writes and reads that dict; the keys are those of every earlier release, so runs
started before it resume.
"""

from __future__ import annotations

import os
import pickle
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from rwdet.atomic import atomic_write
from rwdet.atomic import remove_stale_temp_files as _remove_stale_temp_files
from rwdet.checkpoint_io import model_record
from rwdet.graphs import graphs_fingerprint, graphs_from_dict

LAST, BEST = "last.pth", "best.pth"
CHECKPOINTS = (LAST, BEST)
# What a run leaves in its output folder that a new run would replace (log.txt only grows).
PREVIOUS = "previous"
RUN_FILES = (LAST, BEST, "metrics.jsonl", "config.yaml", "tb")
REQUIRED_KEYS = ("model", "model_spec", "graphs")
# Keyword arguments that change training only (not the weights nor the eval forward pass);
# evaluation-only runs ignore differences in them.
EVAL_NEUTRAL_KWARGS = ("dropout", "edge_drop")


class CheckpointMismatchError(ValueError):
    """The checkpoint holds another architecture or other graphs than the requested model."""


def atomic_save(obj: dict, path: str) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path``.

    A crash (or SIGKILL) at any moment leaves either the old or the new file, never a torn one.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"checkpoint {path!r} cannot be loaded safely (weights_only=True): {e}. Only "
            f"checkpoints written by train_cls.py (tensors and plain values) are accepted"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"checkpoint {path!r} is unreadable or corrupt: {e}") from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED_KEYS):
        raise ValueError(
            f"{path!r} is not an rwdet classification checkpoint: it needs the keys "
            f"{list(REQUIRED_KEYS)}"
        )
    return ckpt


def remove_stale_temp_files(output_dir: str) -> list[str]:
    """Delete the half-written temp files a killed save of a checkpoint left (SIGKILL skips
    ``atomic_write``'s cleanup). Call before this run saves anything."""
    return _remove_stale_temp_files(output_dir, (LAST, BEST))


def latest_checkpoint(output_dir: str) -> str | None:
    """The checkpoint auto-resume continues from: ``last.pth``, which every save refreshes."""
    path = os.path.join(output_dir, LAST)
    return path if os.path.isfile(path) else None


def move_previous_run(output_dir: str) -> tuple[str, list[str]] | None:
    """Move the checkpoints (and the metrics, config and TensorBoard events that describe them)
    of the run in ``output_dir`` into ``previous/<UTC time>/``, before a run that does not
    continue it (``--no-resume``, ``--resume`` of another file) writes its own: a new run must
    never replace a good ``best.pth`` or ``last.pth`` with its own. Returns (folder, names
    moved), or None when the folder holds no checkpoint."""
    present = [n for n in RUN_FILES if os.path.lexists(os.path.join(output_dir, n))]
    if not any(n in CHECKPOINTS for n in present):
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = os.path.join(output_dir, PREVIOUS, stamp)
    n = 1
    while os.path.lexists(dest):  # two fresh starts within one second
        n += 1
        dest = os.path.join(output_dir, PREVIOUS, f"{stamp}-{n}")
    os.makedirs(dest)
    for name in present:  # same file system: each rename is atomic, nothing is copied
        os.replace(os.path.join(output_dir, name), os.path.join(dest, name))
    return dest, present


def nonfinite_tensors(state_dict: dict) -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf."""
    if not isinstance(state_dict, dict):
        return []  # not weights at all: loading them reports that
    return [
        k
        for k, v in state_dict.items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def check_model_spec(ckpt: dict, spec: dict, path: str, eval_only: bool = False) -> None:
    """Raise ``CheckpointMismatchError`` unless the checkpoint holds the requested model."""
    from rwdet.models.artifact import upgrade_spec

    have = upgrade_spec(ckpt["model_spec"])  # keywords renamed since it was written (k -> keep)
    ignore = EVAL_NEUTRAL_KWARGS if eval_only else ()
    diffs = []
    if have.get("name") != spec["name"]:
        diffs.append(f"model: checkpoint {have.get('name')!r}, requested {spec['name']!r}")
    a, b = have.get("kwargs", {}), spec["kwargs"]
    for key in sorted(set(a) | set(b)):
        if key not in ignore and a.get(key) != b.get(key):
            diffs.append(f"{key}: checkpoint {a.get(key)!r}, requested {b.get(key)!r}")
    if not diffs:
        return
    graph_keys = {"gen", "gen_params", "seed", "nodes", "graphs"}
    msg = f"checkpoint {path!r} holds a different model than requested (" + "; ".join(diffs) + ")"
    if any(d.split(":")[0] in graph_keys for d in diffs):
        msg += (
            f". Its graph fingerprint is {graphs_fingerprint(graphs_from_dict(ckpt['graphs']))}; "
            f"the requested graphs differ"
        )
    msg += (
        ". Pass the flags/config the checkpoint was trained with, or a different "
        "--output-dir (or --no-resume) to start a new run"
    )
    raise CheckpointMismatchError(msg)


# ---------------------------------------------------------------------------- training state


@dataclass
class TrainState:
    """What a checkpoint holds besides the model, and where this run keeps its checkpoints.

    ``iteration`` counts optimizer steps over the whole run (the schedule, the sampler position
    and the epoch are functions of it); ``metrics`` holds ``best_top1`` and the last eval's
    ``top1``/``top5``; ``skipped_train`` counts unreadable training images over all ranks.
    ``saved_iteration`` and ``moved_to`` are this process's record of what it wrote or moved
    (for the message of a run that stops on divergence), not saved.
    """

    optimizer: torch.optim.Optimizer
    scheduler: object  # classification.schedule.LrSchedule
    scaler: torch.amp.GradScaler
    ema: object | None  # classification.ema.ModelEMA
    guard: object  # classification.divergence.DivergenceGuard
    iters_per_epoch: int
    classes: list
    last_path: str
    iteration: int = 0
    skipped_train: int = 0
    metrics: dict = field(default_factory=lambda: {"best_top1": -1.0})
    saved_iteration: int | None = None
    moved_to: str | None = None

    def to_checkpoint(self, model: torch.nn.Module, config: dict, rng: list, world: int) -> dict:
        """The checkpoint dict (``rng``: every rank's ``rng_state()``, gathered by the caller;
        ``config`` as plain dicts)."""
        epoch, start_batch = divmod(self.iteration, self.iters_per_epoch)
        ema = self.ema
        return {
            **model_record(unwrap(model)),
            "ema": ema.state_dict() if ema is not None else None,
            "ema_updates": ema.updates if ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": epoch,
            "iteration": self.iteration,
            "rng": rng,
            "sampler": {  # the data order is a function of (seed, epoch); position = start_batch
                "seed": config["seed"],
                "epoch": epoch,
                "start_batch": start_batch,
                "iters_per_epoch": self.iters_per_epoch,
                "world": world,
            },
            "config": config,
            "metrics": dict(self.metrics),
            "classes": list(self.classes),
            "skipped_train": self.skipped_train,
            "guard": self.guard.state_dict(),
        }

    def restore(self, ckpt: dict, model: torch.nn.Module, rank: int, world: int) -> bool:
        """Load everything needed to continue exactly. Returns False (and continues from the
        start of the checkpoint's epoch) when it was written with another number of iterations
        per epoch or of processes, where the RNG streams cannot continue."""
        model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"], ckpt.get("ema_updates", 0))
        self.metrics.update(ckpt.get("metrics") or {})
        self.skipped_train = int(ckpt.get("skipped_train", 0))
        self.guard.load_state_dict(ckpt.get("guard"))  # the level of the run resumed
        it, ipe = int(ckpt["iteration"]), self.iters_per_epoch
        old = ckpt.get("sampler") or {}
        rng = ckpt.get("rng") or []
        exact = old.get("iters_per_epoch") == ipe and old.get("world") == world
        if exact and len(rng) == world:
            set_rng_state(rng[rank])
            self.iteration = it
            return True
        self.iteration = (it // old.get("iters_per_epoch", ipe)) * ipe
        return False

    def kept_checkpoint(self) -> str:
        """What a diverged run leaves behind, for its error message."""
        path = self.last_path
        if self.saved_iteration is not None:
            return f"The last good checkpoint is kept: {path} (iteration {self.saved_iteration})"
        if os.path.isfile(path):
            return f"The last good checkpoint is kept: {path}, untouched by this run"
        if self.moved_to:
            return f"This run saved nothing; the previous run's checkpoints are in {self.moved_to}"
        return "No checkpoint was written yet"


# ---------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states as tensors and ints (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64)},
        "python_gauss": gauss,
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), state["python_gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP and/or torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
