"""Learning rate: linear scaling with the global batch, linear warmup, half-period cosine or
step decay, as fvcore ``ParamScheduler``s (the classes Detectron2 builds its schedules from).

- Linear scaling (Goyal et al. 2017): ``lr = optim.lr * global_batch / optim.reference_batch``.
  Recipes state the reference batch their lr belongs to (RandWire follows Goyal et al.:
  0.1 per 256 images; the DNW recipe is 0.1 per 512; edge-popup 0.256 per 256).
- Half-period cosine (RandWire §4, Loshchilov & Hutter): ``lr_t = lr * 0.5 (1 + cos(pi t/T))``
  over all ``T`` iterations, updated every iteration (not per epoch), reaching 0 at the end.
- Linear warmup (Goyal et al.): over the first ``W`` iterations the cosine value is multiplied by
  a factor rising linearly from ``warmup_factor`` to 1.
- Step decay (``schedule.milestones``): the lr is multiplied by ``gamma`` at each milestone
  epoch, as the DNW authors' small-scale recipe (``apps/small_scale/*.yml``: ``multistep`` at
  epochs 80 and 120 of 160, gamma 0.1), with the same warmup factor in front.

The warmup *multiplies* the main schedule, as this trainer always did, where Detectron2's
``WarmupParamScheduler`` interpolates linearly towards the main schedule's value at ``W``; a
product keeps every iteration's lr identical to the earlier hand-written schedule (to 1e-12,
``tests/test_cls_schedule.py``). fvcore locates an iteration with a 1e-6 tolerance in ``t/T``
(``WHERE_EPSILON``): below 10^6 iterations that changes nothing; beyond, a milestone or the end
of the warmup comes at most ``1e-6 T`` iterations early.

The schedule is a pure function of the iteration, so resuming restores it from one integer.
"""

from __future__ import annotations

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    if reference_batch < 1:
        raise ValueError(f"optim.reference_batch={reference_batch} must be a positive batch size")
    return lr * global_batch / reference_batch


class _Product(ParamScheduler):
    """``main(t) * warmup(t)``: a multiplier in front of a schedule (fvcore composes schedules
    only one after the other)."""

    def __init__(self, main: ParamScheduler, factor: ParamScheduler):
        self.main, self.factor = main, factor

    def __call__(self, where: float) -> float:
        return self.main(where) * self.factor(where)


def param_scheduler(
    lr: float,
    total_iters: int,
    warmup_iters: int = 0,
    warmup_factor: float = 0.1,
    milestones=(),
    gamma: float = 0.1,
) -> ParamScheduler:
    """The lr as a function of ``where = iteration / total_iters`` in [0, 1]."""
    if milestones:
        # fvcore wants distinct milestones after 0; one that repeats (two epochs rounding to one
        # iteration) or lies at 0 takes its gamma all the same, as it always did here.
        stones = sorted(set(m for m in milestones if m > 0))
        values = [lr * gamma ** sum(m <= s for m in milestones) for s in [0, *stones]]
        main = MultiStepParamScheduler(values, num_updates=total_iters, milestones=stones)
    else:
        main = CosineParamScheduler(lr, 0.0)
    if not warmup_iters or warmup_factor == 1.0:
        return main
    if warmup_iters >= total_iters:  # the whole run warms up
        return _Product(main, LinearParamScheduler(warmup_factor, 1.0))
    w = warmup_iters / total_iters
    ramp = CompositeParamScheduler(
        [LinearParamScheduler(warmup_factor, 1.0), ConstantParamScheduler(1.0)],
        lengths=[w, 1.0 - w],
        interval_scaling=["rescaled", "fixed"],
    )
    return _Product(main, ramp)


class LrSchedule:
    """Sets the optimizer's lr every iteration from an fvcore schedule over the whole run."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        total_iters: int,
        warmup_iters: int = 0,
        warmup_factor: float = 0.1,
        milestones=(),
        gamma: float = 0.1,
    ):
        if total_iters < 1:
            raise ValueError(f"the schedule needs at least one iteration (got {total_iters})")
        if not 0.0 <= warmup_factor <= 1.0:
            raise ValueError(f"schedule.warmup_factor={warmup_factor} must lie in [0, 1]")
        milestones = list(milestones)
        if milestones != sorted(milestones) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"milestones {milestones} must be sorted and gamma={gamma} in (0, 1]")
        self.optimizer, self.lr = optimizer, lr
        self.total_iters, self.warmup_iters = total_iters, min(warmup_iters, total_iters)
        self.warmup_factor = warmup_factor
        # A milestone at or past the end is never reached (fvcore refuses it).
        reached = [m for m in milestones if m < total_iters]
        self.scheduler = param_scheduler(
            lr, total_iters, self.warmup_iters, warmup_factor, reached, gamma
        )
        self.iteration = 0

    def lr_at(self, it: int) -> float:
        if it >= self.total_iters:  # past the end (fvcore's warmup part stops before t/T = 1)
            return getattr(self.scheduler, "main", self.scheduler)(1.0)
        return self.scheduler(it / self.total_iters)

    def step(self, it: int) -> float:
        """Set the lr for iteration ``it`` (0-based, counted over the whole run)."""
        self.iteration = it
        lr = self.lr_at(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {  # the keys checkpoints have always had
            "iteration": self.iteration,
            "lr": self.lr,
            "total_iters": self.total_iters,
            "warmup_iters": self.warmup_iters,
            "warmup_factor": self.warmup_factor,
        }

    def load_state_dict(self, state: dict) -> None:
        # Only the position is restored: lr and length come from the (possibly extended) config.
        self.iteration = int(state["iteration"])
