"""Counting on the ``meta`` device: shapes only, no values, no arithmetic.

``torch.device("meta")`` alone already allocates nothing, but a model's initialisation still
runs: every ``kaiming_normal_`` / ``fill_`` / ``zero_`` goes through PyTorch's Python
reference kernels for meta tensors, about a millisecond each, thousands per RandWire network
(most of the build time of RandWire C=154). On a meta tensor they change nothing, so
``meta_build()`` skips them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

T = torch.Tensor
# In-place fills and random draws: on a meta tensor they keep its shape and have no values.
_FILLS = {
    T.normal_, T.uniform_, T.fill_, T.zero_, T.bernoulli_, T.random_, T.exponential_,
    nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.constant_,
    nn.init.ones_, nn.init.zeros_, nn.init.kaiming_normal_, nn.init.kaiming_uniform_,
    nn.init.xavier_normal_, nn.init.xavier_uniform_, nn.init.orthogonal_,
}  # fmt: skip


class _SkipMetaFills(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FILLS and args and isinstance(args[0], T) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def meta_build():
    """Build models under this context to count them (``rwdet.complexity.complexity``)."""
    with torch.device("meta"), _SkipMetaFills():
        yield


def forward_for_shapes(model: nn.Module, shape: tuple[int, ...], retry: Callable[[], None]):
    """``model(zeros(shape))`` for what it calls and the shapes it makes, not for its values.

    A model with real tensors runs on ``meta`` copies of its parameters and buffers (the model
    itself is not touched), so no op does arithmetic. A forward that reads values (an adaptive
    ODE solver's step size) or keeps tensors outside its parameters and buffers cannot run
    there: then ``retry()`` resets what the caller recorded and the forward runs for real."""
    tensors = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    device = next(iter(tensors.values())).device if tensors else torch.device("cpu")
    if device.type == "meta":
        return model(torch.zeros(shape, device="meta"))
    try:
        meta = {name: t.to("meta") for name, t in tensors.items()}
        return torch.func.functional_call(model, meta, (torch.zeros(shape, device="meta"),))
    except (RuntimeError, NotImplementedError):
        retry()
        return model(torch.zeros(shape, device=device))
