"""Running sums of a training window or an evaluation, with named fields.

Each meter's sums live in one float64 tensor on the training device, so that adding a step's
numbers never waits for the device, and one ``all_reduce`` sums every field over the ranks.
Fields are read by name (``sums["images"]``), never by position.
"""

from __future__ import annotations

import logging

import torch

from classification.distributed import all_reduce_sum
from classification.logger import LOG_NAME

log = logging.getLogger(LOG_NAME)


class DeviceSums:
    """Named float64 sums on a device; ``reduced()`` is the only host sync."""

    def __init__(self, fields: tuple[str, ...], device: torch.device):
        self.fields = tuple(fields)
        self._index = {name: i for i, name in enumerate(self.fields)}
        self.values = torch.zeros(len(self.fields), dtype=torch.float64, device=device)

    def add(self, **values) -> None:
        for name, v in values.items():
            self.values[self._index[name]] += v

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[self._index[name]]

    def reduced(self, *names: str) -> dict[str, float]:
        """Summed over all ranks (a collective: every rank calls it), as Python numbers; only
        ``names`` when given."""
        idx = [self._index[n] for n in names] if names else list(range(len(self.fields)))
        total = all_reduce_sum(self.values[idx].clone()).tolist()
        return dict(zip(names or self.fields, total))

    def zero_(self) -> None:
        self.values.zero_()


class TrainWindow(DeviceSums):
    """One logging window of training steps: loss (summed over images), top-1/top-5 hits,
    images, steps with a non-finite loss, and unreadable images skipped."""

    FIELDS = ("loss", "top1", "top5", "images", "nonfinite", "skipped")

    def __init__(self, device: torch.device):
        super().__init__(self.FIELDS, device)

    @torch.no_grad()
    def add_step(self, loss: torch.Tensor, hits: torch.Tensor, n: int) -> None:
        loss = loss.detach().double()
        step = torch.stack(
            [loss * n, *hits.double(), loss.new_tensor(n), (~loss.isfinite()).double()]
        )
        self.values[:5] += step  # FIELDS' order: one kernel per step, not one per field


class EvalSums(DeviceSums):
    """A whole evaluation: loss, top-1/top-5 hits, images, unreadable images skipped."""

    FIELDS = ("loss", "top1", "top5", "images", "skipped")

    def __init__(self, device: torch.device):
        super().__init__(self.FIELDS, device)


def mean_values(sums: dict[str, float]) -> dict[str, float]:
    """Per-image loss and top-1/top-5 in percent from reduced sums."""
    n = max(sums["images"], 1.0)
    return {"loss": sums["loss"] / n, "top1": 100.0 * sums["top1"] / n,
            "top5": 100.0 * sums["top5"] / n}  # fmt: skip


class SkipCounter:
    """Unreadable images met by this rank; each file is logged once per process."""

    _reported: set = set()  # shared: a file met again in a later epoch is not logged again

    def __init__(self):
        self.count = 0

    def add(self, bad: list) -> None:
        for path, reason in bad:
            self.count += 1
            if path not in SkipCounter._reported:
                SkipCounter._reported.add(path)
                log.warning("skipped unreadable image %s (%s)", path, reason)
