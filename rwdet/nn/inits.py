"""The fixed-weight distributions of edge-popup and Zhou et al. supermasks (§4.1, §4.5, Fig. 7).

The weights of a popup or supermask layer are drawn once and never trained, so their
distribution is part of the method. Each name fixes a *shape* and a *std*; ``fan_in`` and
``fan_out`` are PyTorch's (``in_channels/groups * kh * kw`` and ``out_channels * kh * kw``):

============================  =====  ======================  ================================
name                          paper  shape                   std
============================  =====  ======================  ================================
``"kaiming_normal"``          N_k    normal                  ``sqrt(2 / fan_in)``
``"signed_constant"``         U_k    ``+-std``, random sign  ``sqrt(2 / fan_in)``
``"kaiming_uniform"``         —      ``U(-b, b)``, b=std*√3  ``sqrt(2 / fan_in)``
``"xavier_normal"``           N_x    normal                  ``sqrt(2 / (fan_in + fan_out))``
``"signed_xavier_constant"``  U_x    ``+-std``, random sign  ``sqrt(2 / (fan_in + fan_out))``
============================  =====  ======================  ================================

The kaiming rows use the ReLU gain ``√2`` in ``fan_in`` mode (the authors' defaults,
``--mode fan_in --nonlinearity relu``). §4.4 describes N_x/U_x as the kaiming ones "with the
factor of √2 omitted"; that is exactly Glorot's ``sqrt(2 / (fan_in + fan_out))`` when
``fan_in == fan_out`` and is what Zhou et al. and the authors' ``xavier_normal`` /
``xavier_constant`` draw, so rwdet uses Glorot's formula.

**Scaled** (``scale=True``, §4.5 "Scaled"): a subnetwork keeps a fraction ``k`` (rwdet's
keyword ``keep``) of a layer's weights, so each unit sees about ``k * fan_in`` inputs (and
feeds ``k * fan_out`` outputs). Drawing the weights as if the fans were that small keeps the
forward variance of the *subnetwork* at the kaiming/xavier value: every fan is multiplied by
``k``, i.e. the std is divided by ``sqrt(k)``. The extracted paper text reads "scale standard
deviation by 1/k"; the variance argument it gives, and the authors' code, scale the fan, i.e.
the std by ``1/sqrt(k)``. (The authors scale only ``signed_constant`` and ``kaiming_normal``;
rwdet scales every row the same way so that Figure 7's comparison is like for like.)

**The authors' ``prune_rate``** means two opposite things in their code: the mask
(``utils/conv_type.py``, ``GetSubnet``) keeps the top ``prune_rate`` fraction of scores (it
zeroes ``(1 - prune_rate) * n``), while the builder (``utils/builder.py``, ``--scale-fan``)
multiplies the fan by ``1 - prune_rate``, i.e. reads it as the fraction *pruned*. With the
paper's k = 50% the two agree; at any other k their scaled init is sized for the complement
of the subnetwork it is used with. rwdet has one ``keep``, the fraction **kept** everywhere
(``rwdet.nn.choose``), and scales the fan by that same ``keep``: the builder's formula applied to
the mask's reading, which is the one the paper's variance argument (§4.5) asks for.
"""

from __future__ import annotations

import math

import torch

# name -> (shape, fan rule)
_INITS = {
    "kaiming_normal": ("normal", "kaiming"),
    "signed_constant": ("signed", "kaiming"),
    "kaiming_uniform": ("uniform", "kaiming"),
    "xavier_normal": ("normal", "xavier"),
    "signed_xavier_constant": ("signed", "xavier"),
}
FIXED_INITS = tuple(_INITS)
RELU_GAIN = math.sqrt(2.0)


def check_init(init: str) -> None:
    """Refuse an unknown distribution name, listing the known ones."""
    if init not in _INITS:
        raise ValueError(f"init={init!r} is not known; choose one of {list(FIXED_INITS)}")


def fan_rule(init: str) -> str:
    """ "kaiming" (std from the fan-in) or "xavier" (from fan-in + fan-out) for ``init``."""
    check_init(init)
    return _INITS[init][1]


def fans(weight: torch.Tensor) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a linear ``(out, in)`` or conv ``(out, in/groups, kh, kw)``
    weight, as ``torch.nn.init`` counts them."""
    if weight.dim() < 2:
        raise ValueError(f"a weight needs >= 2 dimensions to have fans, got {tuple(weight.shape)}")
    receptive = weight[0][0].numel()
    return weight.shape[1] * receptive, weight.shape[0] * receptive


def init_std(init: str, fan_in: int, fan_out: int, keep: float = 1.0, scale: bool = False) -> float:
    """The std of distribution ``init`` (module table); ``scale`` multiplies every fan by
    ``keep``, the fraction of weights kept."""
    check_init(init)
    f = float(keep) if scale else 1.0
    if _INITS[init][1] == "kaiming":
        return RELU_GAIN / math.sqrt(fan_in * f)
    return math.sqrt(2.0 / ((fan_in + fan_out) * f))


@torch.no_grad()
def sample_(weight: torch.Tensor, std: float, init: str) -> torch.Tensor:
    """Fill ``weight`` in place with ``init``'s shape at the given ``std``."""
    check_init(init)
    shape = _INITS[init][0]
    if shape == "normal":
        return weight.normal_(0.0, std)
    if shape == "signed":
        return weight.bernoulli_(0.5).mul_(2.0).sub_(1.0).mul_(std)
    bound = std * math.sqrt(3.0)  # U(-b, b) has std b / sqrt(3)
    return weight.uniform_(-bound, bound)


def init_fixed_weight_(weight: torch.Tensor, init: str, keep: float = 1.0, scale=False):
    """Draw a popup/supermask layer's fixed ``weight`` in place from ``init``."""
    fan_in, fan_out = fans(weight)
    return sample_(weight, init_std(init, fan_in, fan_out, keep, scale), init)
