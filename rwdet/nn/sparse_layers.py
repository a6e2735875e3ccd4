"""Layer types whose weights are chosen per step: edge-popup's and DNW's sparse layers.

- ``PopupConv2d`` / ``PopupLinear`` (edge-popup, Ramanujan et al. 2020): the weights are fixed
  at their random initialisation (``requires_grad=False``: no gradient, so no update and no
  weight decay, whatever optimizer they are handed to) and each has a learnable score; the
  layer uses the weights of the top ``round(keep*n)`` ``|scores|`` (``rwdet.nn.choose``).
- ``DNWConv2d`` / ``DNWLinear`` (DNW §3.4, Table 4): ordinary learned weights of which the
  ``round(keep*n)`` largest in magnitude are used; every weight gets a gradient. Biases stay dense.
- ``nonaffine_batchnorm``: BatchNorm with running statistics only (edge-popup never tunes the
  BN affine parameters; with ``affine=False`` there are none to tune).

- ``SupermaskConv2d`` / ``SupermaskLinear`` (Zhou et al. 2019, the baseline of edge-popup §4.4):
  the same fixed weights, a score per weight, a fresh Bernoulli(sigmoid(score)) mask on every
  training forward pass and a deterministic mask in evaluation (``rwdet.nn.choose``).

``keep`` is always the fraction of weights **kept**, the papers' ``k`` (a supermask learns its
own; there ``keep`` only sizes the "scaled" initialisation). The old keyword ``k=`` is refused
with a pointer to ``keep=`` (``rwdet.nn.choose.refuse_k``).

The fixed weights are drawn from one of ``rwdet.nn.inits.FIXED_INITS`` (N_k, U_k, N_x, U_x,
kaiming uniform), optionally "scaled" by the fraction kept ``keep``; ``rwdet.nn.inits`` states the
formulas and how they relate to the authors' ``prune_rate``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from rwdet.nn.choose import (
    check_supermask_eval,
    dnw_weight,
    kept_count,
    popup_mask,
    refuse_k,
    supermask_mask,
    topk_mask,
)
from rwdet.nn.inits import FIXED_INITS, check_init, init_fixed_weight_, sample_

POPUP_INITS = FIXED_INITS  # the name other modules import


def init_fixed_(weight: torch.Tensor, std: float, init: str) -> torch.Tensor:
    """Fill ``weight`` with ``init``'s shape (normal, signed constant, uniform) at ``std``."""
    return sample_(weight, std, init)


_check_init = check_init


def _init_scores(weight: torch.Tensor) -> nn.Parameter:
    # The authors' choice for both edge-popup and supermask scores: kaiming-uniform with
    # a=sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)). For popup only the order matters;
    # for a supermask it starts every p = sigmoid(score) near 0.5.
    bound = 1.0 / math.sqrt(weight[0].numel())
    return nn.Parameter(torch.empty_like(weight).uniform_(-bound, bound))


class _PopupMixin:
    """Shared by the popup layers: a fixed ``weight`` and a learnable ``scores`` of its shape."""

    def _setup_popup(self, keep: float, init: str, scale: bool) -> None:
        check_init(init)
        self.keep, self.init, self.scale = float(keep), init, bool(scale)
        self.count = kept_count(keep, self.weight.numel())
        init_fixed_weight_(self.weight, init, self.keep, self.scale)
        self.weight.requires_grad_(False)
        self.scores = _init_scores(self.weight)

    def kept_mask(self) -> torch.Tensor:
        """Boolean mask of the weights in the subnetwork now."""
        return topk_mask(self.scores.abs(), self.count).bool()

    def masked_weight(self) -> torch.Tensor:
        return self.weight * popup_mask(self.scores, self.count)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}, init={self.init}, scale={self.scale}"


class PopupConv2d(_PopupMixin, nn.Conv2d):
    """``nn.Conv2d`` with fixed random weights and a learned top-k subnetwork (edge-popup)."""

    def __init__(
        self, *args, keep: float = 0.3, init="signed_constant", scale=True, k=None, **kwargs
    ):
        refuse_k(k, "PopupConv2d")
        if kwargs.get("bias", False):
            raise ValueError("PopupConv2d has no learned bias in edge-popup; pass bias=False")
        kwargs["bias"] = False
        super().__init__(*args, **kwargs)
        self._setup_popup(keep, init, scale)

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
        keep: float = 0.3,
        init: str = "signed_constant",
        scale: bool = True,
        k=None,
    ):
        super().__init__()
        refuse_k(k, "PopupLinear")
        if bias:
            raise ValueError("PopupLinear has no learned bias in edge-popup; pass bias=False")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._setup_popup(keep, init, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"keep={self.keep}, init={self.init}, scale={self.scale}"
        )


class _SupermaskMixin:
    """Shared by the supermask layers: a fixed ``weight`` and a learnable ``scores``; the mask
    is ``rwdet.nn.choose.supermask_mask`` (sampled in training, deterministic in eval).

    Layer keywords:
        init, scale: the fixed weights' distribution (``rwdet.nn.inits``).
        keep: only sizes the "scaled" distribution (the fraction kept is learned, not chosen;
            0.5 is where the score initialisation starts every p).
        eval_mask: the evaluation mask, "threshold" (p > 0.5), "expected" or "sample"
            (``rwdet.nn.choose``).
    """

    def _setup_supermask(self, init: str, scale: bool, keep: float, eval_mask: str) -> None:
        check_init(init)
        check_supermask_eval(eval_mask)
        kept_count(keep, 1)  # validates keep
        self.init, self.scale, self.keep = init, bool(scale), float(keep)
        self.eval_mask = eval_mask
        init_fixed_weight_(self.weight, init, self.keep, self.scale)
        self.weight.requires_grad_(False)
        self.scores = _init_scores(self.weight)

    def kept_mask(self) -> torch.Tensor:
        """Boolean mask of the weights the evaluation network uses (all of them for
        ``eval_mask="expected"``, which scales rather than removes weights)."""
        with torch.no_grad():
            if self.eval_mask == "expected":
                return torch.ones_like(self.scores, dtype=torch.bool)
            return self.scores > 0

    def masked_weight(self) -> torch.Tensor:
        return self.weight * supermask_mask(self.scores, self.training, self.eval_mask)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, init={self.init}, scale={self.scale}, keep={self.keep}, "
            f"eval_mask={self.eval_mask}"
        )


class SupermaskConv2d(_SupermaskMixin, nn.Conv2d):
    """``nn.Conv2d`` with fixed random weights and a learned Bernoulli mask (Zhou et al.);
    keywords as ``_SupermaskMixin`` lists them."""

    def __init__(
        self, *args, init="signed_constant", scale=False, keep=0.5, eval_mask="threshold",
        k=None, **kw,
    ):  # fmt: skip
        refuse_k(k, "SupermaskConv2d")
        if kw.get("bias", False):
            raise ValueError("SupermaskConv2d has no learned bias; pass bias=False")
        kw["bias"] = False
        super().__init__(*args, **kw)
        self._setup_supermask(init, scale, keep, eval_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), None)


class SupermaskLinear(_SupermaskMixin, nn.Module):
    """A fully-connected layer with fixed random weights and a learned Bernoulli mask; not an
    ``nn.Linear`` subclass, for the reason ``PopupLinear`` gives."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        init: str = "signed_constant",
        scale: bool = False,
        keep: float = 0.5,
        eval_mask: str = "threshold",
        k=None,
    ):
        super().__init__()
        refuse_k(k, "SupermaskLinear")
        if bias:
            raise ValueError("SupermaskLinear has no learned bias; pass bias=False")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._setup_supermask(init, scale, keep, eval_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"init={self.init}, scale={self.scale}, keep={self.keep}, eval_mask={self.eval_mask}"
        )


class _DNWMixin:
    """Shared by the DNW sparse layers: the top ``round(keep*n)`` ``|weight|`` are used."""

    def _setup_dnw(self, keep: float) -> None:
        self.keep = float(keep)
        self.count = kept_count(keep, self.weight.numel())

    def kept_mask(self) -> torch.Tensor:
        return topk_mask(self.weight.abs(), self.count).bool()

    def masked_weight(self) -> torch.Tensor:
        return dnw_weight(self.weight, self.count)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, keep={self.keep}"


class DNWConv2d(_DNWMixin, nn.Conv2d):
    """Sparse training by DNW (Table 4): a fixed fraction ``keep`` of the weights is used."""

    def __init__(self, *args, keep: float = 0.1, k=None, **kwargs):
        refuse_k(k, "DNWConv2d")
        super().__init__(*args, **kwargs)
        self._setup_dnw(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.masked_weight(), self.bias)


class DNWLinear(_DNWMixin, nn.Linear):
    """``nn.Linear`` trained sparse by DNW; the bias stays dense."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, keep=0.1, k=None):
        refuse_k(k, "DNWLinear")
        super().__init__(in_features, out_features, bias)
        self._setup_dnw(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.masked_weight(), self.bias)


def nonaffine_batchnorm(num_features: int) -> nn.BatchNorm2d:
    """BatchNorm2d with running statistics only (edge-popup's NonAffineBatchNorm)."""
    return nn.BatchNorm2d(num_features, affine=False)


SPARSE_LAYERS = (PopupConv2d, PopupLinear, DNWConv2d, DNWLinear)
SUPERMASK_LAYERS = (SupermaskConv2d, SupermaskLinear)
# Layers whose fixed weights never train and whose ``kept_mask()`` is the subnetwork.
MASKED_LAYERS = (*SPARSE_LAYERS, *SUPERMASK_LAYERS)
