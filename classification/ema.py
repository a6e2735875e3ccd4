"""Exponential moving average of the weights (optional; evaluated next to the model).

Parameters are averaged; buffers (BatchNorm running statistics) are copied from the model, as
averaging running averages would lag twice. The decay ramps up as ``min(decay, (1+n)/(10+n))``
after ``n`` updates so that the early average is not dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay} must lie in (0, 1)")
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        params = dict(model.named_parameters())
        for name, p in self.module.named_parameters():
            p.lerp_(params[name].detach(), 1.0 - d)
        buffers = dict(model.named_buffers())
        for name, b in self.module.named_buffers():
            b.copy_(buffers[name])

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict, updates: int) -> None:
        self.module.load_state_dict(state)
        self.updates = int(updates)
