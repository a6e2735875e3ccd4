"""Layer types whose weights are chosen per step: edge-popup's and DNW's sparse layers.

- ``PopupConv2d`` / ``PopupLinear`` (edge-popup, Ramanujan et al. 2020): the weights are fixed
  at their random initialisation (``requires_grad=False``: no gradient, so no update and no
  weight decay, whatever optimizer they are handed to) and each has a learnable score; the
  layer uses the weights of the top ``round(k*n)`` ``|scores|`` (``rwdet.nn.choose``).
- ``DNWConv2d`` / ``DNWLinear`` (DNW §3.4, Table 4): ordinary learned weights of which the
  ``round(k*n)`` largest in magnitude are used; every weight gets a gradient. Biases stay dense.
- ``nonaffine_batchnorm``: BatchNorm with running statistics only (edge-popup never tunes the
  BN affine parameters; with ``affine=False`` there are none to tune).

``k`` is always the fraction of weights **kept**.

Fixed-weight initialisations (edge-popup §4.1, §4.5), ``fan_in`` mode with ReLU gain, so
``std = sqrt(2 / fan_in)``:

- ``"kaiming_normal"``: ``N(0, std^2)``.
- ``"signed_constant"``: ``+-std`` with a random sign (same variance as kaiming normal).
- ``scale=True`` ("Scaled" in §4.5): the subnetwork keeps ``k`` of each unit's inputs, so the
  forward variance matches kaiming when the fan-in is taken as ``k * fan_in``: ``std /= sqrt(k)``.
  (The extracted paper text reads "scale standard deviation by 1/k"; the variance argument it
  gives, and the authors' code, divide the fan-in by k, i.e. the std by sqrt(k).)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rwdet.nn.choose import dnw_weight, kept_count, popup_mask, topk_mask

POPUP_INITS = ("kaiming_normal", "signed_constant")


def fixed_init_std(fan_in: int, k: float, scale: bool, gain: float = math.sqrt(2.0)) -> float:
    """The std of edge-popup's fixed weights for a unit with ``fan_in`` inputs."""
    return gain / math.sqrt(fan_in * (k if scale else 1.0))


@torch.no_grad()
def init_fixed_(weight: torch.Tensor, std: float, init: str) -> torch.Tensor:
    if init == "kaiming_normal":
        return weight.normal_(0.0, std)
    if init == "signed_constant":
        return weight.bernoulli_(0.5).mul_(2.0).sub_(1.0).mul_(std)
    raise ValueError(f"init={init!r} is not known; choose one of {list(POPUP_INITS)}")


def _check_init(init: str) -> None:
    if init not in POPUP_INITS:
        raise ValueError(f"init={init!r} is not known; choose one of {list(POPUP_INITS)}")


class _PopupMixin:
    """Shared by the popup layers: a fixed ``weight`` and a learnable ``scores`` of its shape."""

    def _setup_popup(self, k: float, init: str, scale: bool, fan_in: int) -> None:
        _check_init(init)
        self.k, self.init, self.scale = float(k), init, bool(scale)
        self.count = kept_count(k, self.weight.numel())
        init_fixed_(self.weight, fixed_init_std(fan_in, self.k, self.scale), init)
        self.weight.requires_grad_(False)
        # Scores: any scale works (only their order matters); the authors' choice is
        # kaiming-uniform, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        self.scores = nn.Parameter(torch.empty_like(self.weight).uniform_(-bound, bound))

    def kept_mask(self) -> torch.Tensor:
        """Boolean mask of the weights in the subnetwork now."""
        return topk_mask(self.scores.abs(), self.count).bool()

    def masked_weight(self) -> torch.Tensor:
        return self.weight * popup_mask(self.scores, self.count)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, init={self.init}, scale={self.scale}"


class PopupConv2d(_PopupMixin, nn.Conv2d):
    """``nn.Conv2d`` with fixed random weights and a learned top-k subnetwork (edge-popup)."""

    def __init__(self, *args, k: float = 0.3, init="signed_constant", scale=True, **kwargs):
        if kwargs.get("bias", False):
            raise ValueError("PopupConv2d has no learned bias in edge-popup; pass bias=False")
        kwargs["bias"] = False
        super().__init__(*args, **kwargs)
        fan_in = self.weight[0].numel()  # in_channels / groups * kernel area
        self._setup_popup(k, init, scale, fan_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), None)


class PopupLinear(_PopupMixin, nn.Module):
    """A fully-connected layer with fixed random weights and a learned subnetwork.

    Not an ``nn.Linear`` subclass on purpose: model code re-initialises every ``nn.Linear``
    (e.g. ``N(0, 0.01)``), which must not touch edge-popup's fixed weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        k: float = 0.3,
        init: str = "signed_constant",
        scale: bool = True,
    ):
        super().__init__()
        if bias:
            raise ValueError("PopupLinear has no learned bias in edge-popup; pass bias=False")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._setup_popup(k, init, scale, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"k={self.k}, init={self.init}, scale={self.scale}"
        )


class _DNWMixin:
    """Shared by the DNW sparse layers: the top ``round(k*n)`` ``|weight|`` are used."""

    def _setup_dnw(self, k: float) -> None:
        self.k = float(k)
        self.count = kept_count(k, self.weight.numel())

    def kept_mask(self) -> torch.Tensor:
        return topk_mask(self.weight.abs(), self.count).bool()

    def masked_weight(self) -> torch.Tensor:
        return dnw_weight(self.weight, self.count)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


class DNWConv2d(_DNWMixin, nn.Conv2d):
    """Sparse training by DNW (Table 4): a fixed fraction ``k`` of the weights is used."""

    def __init__(self, *args, k: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self._setup_dnw(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class DNWLinear(_DNWMixin, nn.Linear):
    """``nn.Linear`` trained sparse by DNW; the bias stays dense."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k=0.1):
        super().__init__(in_features, out_features, bias)
        self._setup_dnw(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def nonaffine_batchnorm(num_features: int) -> nn.BatchNorm2d:
    """BatchNorm2d with running statistics only (edge-popup's NonAffineBatchNorm)."""
    return nn.BatchNorm2d(num_features, affine=False)


SPARSE_LAYERS = (PopupConv2d, PopupLinear, DNWConv2d, DNWLinear)
