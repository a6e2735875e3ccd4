"""Width matching: the width at which a variant of a network costs what the original costs.

RandWire §4.1 (Figure 6) compares node operations at (roughly) equal complexity: swapping the
3x3 separable conv for a regular 3x3 conv or pool + 1x1 conv changes FLOPs a lot, so "we adjust
the factor C to keep the complexity". ``matched_width`` does that for any family: it takes a
builder ``width -> model`` and a builder of the reference model, and knows nothing of the
model's kind (RandWire calls it with its own constructor, ``rwdet.models.randwire``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable

import torch
from torch import nn

from rwdet.complexity.analytic import count_ops
from rwdet.complexity.meta import meta_build

PROBE_SIZE = 64  # FLOPs of fully-convolutional nets scale with the input area

_MATCHED: dict[Hashable, int] = {}  # searches are slow (dozens of meta-device builds): memoised


def meta_flops(build: Callable[[], nn.Module], size: int = PROBE_SIZE) -> int:
    """Multiply-adds (``rwdet.complexity.analytic``) of ``build()``'s model on one 3 x size²
    image, built and run on the ``meta`` device: no weights are filled, no arithmetic runs."""
    with meta_build():
        model = build()
    x = torch.zeros(1, 3, size, size, device="meta")
    return count_ops(model.eval(), x).flops


def matched_width(
    build: Callable[[int], nn.Module],
    reference: Callable[[], nn.Module],
    start: int,
    *,
    key: Hashable = None,
) -> int:
    """The width ``w >= 2`` whose ``build(w)`` has the FLOPs nearest ``reference()``'s
    (``meta_flops`` at ``PROBE_SIZE``), searched from ``start`` by bisection (the FLOPs of
    these builders grow with the width).

    key: what identifies ``build`` and ``reference`` for the memo (e.g. the model's keywords);
        dicts and lists in it are compared by content. None: no memo.
    """
    memo = None if key is None else _freeze(key)
    if memo is not None and memo in _MATCHED:
        return _MATCHED[memo]
    target = meta_flops(reference)

    seen: dict[int, int] = {}

    def flops(w: int) -> int:
        if w not in seen:
            seen[w] = meta_flops(lambda: build(w))
        return seen[w]

    lo, hi = 2, max(2, start)
    while flops(hi) < target:  # the variant may be cheaper than the original: widen
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if flops(mid) < target:
            lo = mid
        else:
            hi = mid
    width = min((lo, hi), key=lambda w: abs(flops(w) - target))
    if memo is not None:
        _MATCHED[memo] = width
    return width


def _freeze(value) -> Hashable:
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    try:
        hash(value)
    except TypeError:
        return json.dumps(value, sort_keys=True, default=repr)
    return value
