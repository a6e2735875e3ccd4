"""Learning rate: linear scaling with the global batch, linear warmup, half-period cosine or
step decay.

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

The scheduler is a pure function of the iteration, so resuming restores it from one integer.
"""

from __future__ import annotations

import math

import torch


def scaled_lr(lr: float, global_batch: int, reference_batch: int) -> float:
    if reference_batch < 1:
        raise ValueError(f"optim.reference_batch={reference_batch} must be a positive batch size")
    return lr * global_batch / reference_batch


class CosineWarmup:
    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr: float,
        total_iters: int,
        warmup_iters: int = 0,
        warmup_factor: float = 0.1,
    ):
        if total_iters < 1:
            raise ValueError(f"the schedule needs at least one iteration (got {total_iters})")
        if not 0.0 <= warmup_factor <= 1.0:
            raise ValueError(f"schedule.warmup_factor={warmup_factor} must lie in [0, 1]")
        self.optimizer, self.lr = optimizer, lr
        self.total_iters, self.warmup_iters = total_iters, min(warmup_iters, total_iters)
        self.warmup_factor = warmup_factor
        self.iteration = 0

    def lr_at(self, it: int) -> float:
        lr = (
            self.lr * 0.5 * (1.0 + math.cos(math.pi * min(it, self.total_iters) / self.total_iters))
        )
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            lr *= self.warmup_factor * (1.0 - alpha) + alpha
        return lr

    def step(self, it: int) -> float:
        """Set the lr for iteration ``it`` (0-based, counted over the whole run)."""
        self.iteration = it
        lr = self.lr_at(it)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {
            "iteration": self.iteration,
            "lr": self.lr,
            "total_iters": self.total_iters,
            "warmup_iters": self.warmup_iters,
            "warmup_factor": self.warmup_factor,
        }

    def load_state_dict(self, state: dict) -> None:
        # Only the position is restored: lr and length come from the (possibly extended) config.
        self.iteration = int(state["iteration"])


class MultiStepWarmup(CosineWarmup):
    """Step decay: ``lr * gamma^(milestones passed)``, milestones in iterations (sorted)."""

    def __init__(self, optimizer, lr, total_iters, milestones, gamma=0.1, **warmup):
        super().__init__(optimizer, lr, total_iters, **warmup)
        if list(milestones) != sorted(milestones) or not 0.0 < gamma <= 1.0:
            raise ValueError(f"milestones {milestones} must be sorted and gamma={gamma} in (0, 1]")
        self.milestones, self.gamma = list(milestones), gamma

    def lr_at(self, it: int) -> float:
        lr = self.lr * self.gamma ** sum(it >= m for m in self.milestones)
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            lr *= self.warmup_factor * (1.0 - alpha) + alpha
        return lr
