"""Exponential moving average of the weights (optional; evaluated next to the model).

The average is a ``torch.optim.swa_utils.AveragedModel`` with ``use_buffers=False``: parameters
are averaged, buffers (BatchNorm running statistics) are copied from the model, as averaging
running averages would lag twice. Its averaging function is not ``get_ema_multi_avg_fn(decay)``
but the same lerp with a decay that ramps up as ``min(decay, (1+n)/(10+n))`` after ``n``
updates (as TensorFlow's ``ExponentialMovingAverage``), so that the early average is not
dominated by the random initialisation; this is the EMA this trainer always had, so runs
continue unchanged.

Cost: ``AveragedModel.update_parameters`` copies its CPU ``n_averaged`` counter to the
parameters' device on every update without ``non_blocking``, so on CUDA the host waits for the
queued step once per iteration (not yet timed on a GPU). EMA is off by default (``train.ema``).

Checkpoints store the averaged network's own state dict under ``"ema"`` (the model's keys, as
``rwdet.models.artifact`` reads them with ``weights="ema"``) and ``n`` as ``"ema_updates"``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must lie in (0, 1)")
        self.decay, self.updates = decay, 0
        # The first update_parameters copies the model (no averaging): the start of the ramp.
        self.averaged = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=False)
        self.averaged.update_parameters(model)
        self.module = self.averaged.module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def _lerp(self, averaged: list, current: list, _num_averaged) -> None:
        # The ramp reads the host-side count: reading AveragedModel's device tensor would add
        # a second sync per step.
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        for a, p in zip(averaged, current):
            a.lerp_(p, 1.0 - d)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        self.averaged.update_parameters(model)  # also copies the buffers

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)
        self.averaged.n_averaged.fill_(self.updates + 1)
