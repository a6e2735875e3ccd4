"""Accuracy counts and peak memory."""

from __future__ import annotations

import resource
import sys

import torch


@torch.no_grad()
def topk_hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[top-1 hits, top-5 hits]`` as a device tensor (no host sync; k capped at the classes)."""
    k = min(5, logits.shape[1])
    hit = logits.float().topk(k, dim=1).indices.eq(targets[:, None])
    return torch.stack([hit[:, :1].any(1).sum(), hit.any(1).sum()])


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
