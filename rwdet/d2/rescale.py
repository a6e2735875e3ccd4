"""detectron2's ``REFERENCE_WORLD_SIZE`` rescaling (``DefaultTrainer.auto_scale_workers``),
checked before any worker starts and stated in one log line when it applies.

A config written for 8 workers (``REFERENCE_WORLD_SIZE 8``) keeps its images per worker on
another world size: the batch and LR scale by ``workers / 8``, the iteration counts by
``8 / workers``. detectron2 only asserts that this divides, and a 1-GPU debug run then trains
8x longer than the file says with no more than an info line.
"""

from __future__ import annotations

from detectron2.engine import DefaultTrainer

from rwdet.run.errors import UserError

# What ``DefaultTrainer.auto_scale_workers`` rescales, in the order a reader checks them.
RESCALED = (
    "SOLVER.IMS_PER_BATCH",
    "SOLVER.BASE_LR",
    "SOLVER.MAX_ITER",
    "SOLVER.STEPS",
    "SOLVER.WARMUP_ITERS",
    "SOLVER.CHECKPOINT_PERIOD",
    "TEST.EVAL_PERIOD",
)


def _value(cfg, key: str) -> str:
    group, name = key.split(".")
    value = cfg[group][name]
    if isinstance(value, float):
        return f"{value:g}"
    return str(tuple(value) if isinstance(value, (list, tuple)) else value)


def rescaling_note(cfg, scaled) -> str | None:
    """The one line saying what ``auto_scale_workers`` changed (``scaled``, from ``cfg``).

    detectron2 rescales silently enough that a 1-GPU debug run of a config written for 8
    workers trains 8x longer than the file says; this line makes that visible."""
    ref, workers = cfg.SOLVER.REFERENCE_WORLD_SIZE, scaled.SOLVER.REFERENCE_WORLD_SIZE
    if ref == workers:
        return None
    changes = ", ".join(
        f"{key} {_value(cfg, key)} -> {_value(scaled, key)}"
        for key in RESCALED
        if key.startswith("SOLVER.") or _value(cfg, key) != _value(scaled, key)
    )
    return (
        f"SOLVER.REFERENCE_WORLD_SIZE {ref} rescaled to {_workers(workers)}: {changes} "
        "(SOLVER.REFERENCE_WORLD_SIZE 0 trains with the config's values as written)"
    )


def _workers(n: int) -> str:
    return f"{n} worker" + ("s" if n != 1 else "")


def _batch_lr_iters(cfg) -> str:
    s = cfg.SOLVER
    return f"batch {s.IMS_PER_BATCH}, BASE_LR {s.BASE_LR:g}, MAX_ITER {s.MAX_ITER}"


def check_batch_split(cfg, world_size: int) -> None:
    """Refuse, before any worker starts, a batch that detectron2 cannot split or rescale.

    ``auto_scale_workers`` keeps ``IMS_PER_BATCH / REFERENCE_WORLD_SIZE`` images per worker,
    so it needs that to divide (else a bare ``AssertionError: Invalid REFERENCE_WORLD_SIZE``);
    the data loader then needs the batch to split over the workers."""
    s = cfg.SOLVER
    ref, batch = s.REFERENCE_WORLD_SIZE, s.IMS_PER_BATCH
    if batch < 1 or ref < 0:
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {batch} and SOLVER.REFERENCE_WORLD_SIZE {ref}: set a batch "
            "of at least 1 and a REFERENCE_WORLD_SIZE of 0 (no rescaling) or the number of "
            "workers the config's schedule is written for"
        )
    if ref not in (0, world_size) and batch % ref:
        # The batch written for ``ref`` workers that rescales to this batch on ``world_size``.
        fit = batch * ref // world_size if batch % world_size == 0 else ref * round(batch / ref)
        fit = max(fit, ref)
        suggested = cfg.clone()
        suggested.defrost()
        suggested.SOLVER.IMS_PER_BATCH = fit
        scaled = DefaultTrainer.auto_scale_workers(suggested, world_size)
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {batch} is not a multiple of SOLVER.REFERENCE_WORLD_SIZE "
            f"{ref}, so detectron2 cannot rescale the schedule to {_workers(world_size)}; set "
            f"SOLVER.REFERENCE_WORLD_SIZE 0 to train with the values as written "
            f"({_batch_lr_iters(cfg)}), or SOLVER.IMS_PER_BATCH {fit} (the batch for {ref} "
            f"workers), which rescales to {_batch_lr_iters(scaled)}"
        )
    if ref in (0, world_size) and batch % world_size:
        fit = world_size * max(1, round(batch / world_size))
        raise UserError(
            f"SOLVER.IMS_PER_BATCH {batch} does not split evenly over {_workers(world_size)}; "
            f"set SOLVER.IMS_PER_BATCH {fit} (a multiple of {world_size})"
        )
    # Rescaled to more workers, a short schedule can round to 0 (a 0 checkpoint period
    # would be a ZeroDivisionError in the first iteration).
    scaled = DefaultTrainer.auto_scale_workers(cfg, world_size).SOLVER
    for key in ("MAX_ITER", "CHECKPOINT_PERIOD"):
        if s[key] >= 1 > scaled[key]:
            raise UserError(
                f"SOLVER.{key} {s[key]} becomes 0 when SOLVER.REFERENCE_WORLD_SIZE {ref} is "
                f"rescaled to {_workers(world_size)}; set SOLVER.{key} "
                f"{-(-world_size // ref)} or more, or SOLVER.REFERENCE_WORLD_SIZE 0"
            )
