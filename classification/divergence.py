"""The divergence guard: a diverging run stops before it can replace a good checkpoint.

NaN/Inf are not the only way a run dies: with a far too large learning rate the weights can
grow to 1e21 and the loss to 1e10 for several steps before anything is non-finite, and a
checkpoint written then would be called "good". The guard therefore also watches

- the loss of every logged window against its running level (an EMA over windows that were
  not spikes): ``patience`` windows in a row above ``max(factor x level, level + margin)`` stop
  the run, and so does a save due while the latest window is such a spike;
- the largest trainable weight magnitude against ``max_weight``.

The limits are the ``train.divergence_*`` keys (classification/defaults.py); the running level
is saved in every checkpoint, so a resumed run compares against the level of the good run.
All the inputs are summed over ranks (or identical on all ranks, as DDP weights are), so every
rank stops at the same step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

EMA_BETA = 0.9  # weight of the running level per window: it follows a few dozen windows


class DivergenceError(FloatingPointError):
    """Training diverged; the last good checkpoint was left as it was."""


FIX = (
    "lower the learning rate (optim.lr / --lr), add warmup (--warmup-epochs) or gradient "
    "clipping (--clip-grad), or use --amp bf16 instead of fp16"
)


class DivergenceGuard:
    def __init__(self, train_cfg: dict):
        self.factor = float(train_cfg["divergence_factor"])
        self.margin = float(train_cfg["divergence_margin"])
        self.patience = int(train_cfg["divergence_patience"])
        self.max_weight = float(train_cfg["divergence_max_weight"]) or None  # 0: no bound
        self.level: float | None = None  # running loss level (EMA over non-spike windows)
        self.streak = 0  # spikes in a row, up to the latest logged window
        self.last_spike = ""
        self.last_loss: float | None = None  # of the latest logged window

    def state_dict(self) -> dict:
        return {"loss_level": self.level}

    def load_state_dict(self, state: dict | None) -> None:
        level = (state or {}).get("loss_level")
        self.level = float(level) if level is not None and math.isfinite(level) else None

    def level_text(self) -> str:
        """The latest window's loss against the running level, for the error messages."""
        last = "none yet" if self.last_loss is None else f"{self.last_loss:.4g}"
        level = "none yet" if self.level is None else f"{self.level:.4g}"
        return f"last logged loss {last}, running level {level}"

    def check_loss(self, loss: float, it: int, kept: str) -> None:
        """One logged window's mean loss (over all ranks), after step ``it``."""
        if not math.isfinite(loss):
            raise self.error(it, f"the loss is {loss} ({self.level_text()})", kept)
        self.last_loss = loss
        if self.level is None:
            self.level = loss
            return
        limit = max(self.factor * self.level, self.level + self.margin)
        if loss <= limit:
            self.streak = 0
            self.level = EMA_BETA * self.level + (1 - EMA_BETA) * loss
            return
        self.streak += 1
        self.last_spike = (
            f"the loss {loss:.4g} is above its running level {self.level:.4g} (limit "
            f"{limit:.4g}, train.divergence_factor/margin) for {self.streak} logged window"
            f"{'s' * (self.streak > 1)}"
        )
        if self.streak >= self.patience:
            raise self.error(it, self.last_spike, kept)

    def check_weights(self, model: nn.Module, it: int, kept: str) -> None:
        params = [p.detach() for p in model.parameters() if p.numel()]
        if not params:
            return
        with torch.no_grad():  # NaN propagates through max: one host sync for all of them
            peak = torch.stack([p.abs().max().float() for p in params]).max().item()
        if not math.isfinite(peak):
            raise self.error(it, f"the weights became NaN/Inf ({self.level_text()})", kept)
        if self.max_weight is not None and peak > self.max_weight:
            raise self.error(
                it,
                f"a weight reached magnitude {peak:.3g} (train.divergence_max_weight="
                f"{self.max_weight:.3g}; {self.level_text()})",
                kept,
            )

    def check_before_save(self, model: nn.Module, it: int, kept: str) -> None:
        """Only a state that passed the guard may replace a checkpoint."""
        self.check_weights(model, it, kept)
        if self.streak:
            raise self.error(it, self.last_spike + " when a checkpoint was due", kept)

    def error(self, it: int, what: str, kept: str) -> DivergenceError:
        return DivergenceError(
            f"training diverged at iteration {it + 1}: {what}; stopped before saving. {kept}. "
            f"To fix: {FIX}"
        )
