"""Accuracy counts, running averages and peak memory."""

from __future__ import annotations

import resource
import sys

import torch


@torch.no_grad()
def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose target is among the top-k logits, for each k (k capped at C)."""
    maxk = min(max(ks), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices
    hit = pred.eq(targets[:, None])
    return [int(hit[:, : min(k, maxk)].any(dim=1).sum()) for k in ks]


class Average:
    """Weighted running mean over the current logging window and over the whole epoch."""

    def __init__(self):
        self.total = self.count = self.window_total = self.window_count = 0.0

    def update(self, value: float, n: float = 1.0) -> None:
        self.total += value * n
        self.count += n
        self.window_total += value * n
        self.window_count += n

    @property
    def window(self) -> float:
        return self.window_total / max(self.window_count, 1e-12)

    @property
    def mean(self) -> float:
        return self.total / max(self.count, 1e-12)

    def reset_window(self) -> None:
        self.window_total = self.window_count = 0.0


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
