"""edge-popup's rules (Ramanujan et al. 2020, §3; issue #18), on layers and a popup ResNet.

Complements ``test_popup_layers.py`` (which counts ``kept_mask()`` with tied scores and checks
bit-identical fixed weights under SGD with momentum and weight decay — not repeated here):
here the mask is checked where it matters, in the *forward pass*, against the rule itself —
the ``round(k * n)`` entries (half up, at least one: ``rwdet.nn.choose.kept_count``) with the
largest ``|score|`` — on half-integer ``k * n`` layers and on every layer of a popup ResNet
built for real.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rwdet.models import build_model
from rwdet.nn.sparse_layers import PopupConv2d, PopupLinear


def expected_count(n: int, k: float) -> int:
    """``round(k * n)``, half up, at least one (the library's documented rounding)."""
    return max(1, min(n, math.floor(k * n + 0.5)))


def reference_output(layer, inp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    w = layer.weight.detach() * mask
    if isinstance(layer, PopupLinear):
        return F.linear(inp, w)
    return F.conv2d(inp, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def assert_forward_uses_top_scores(layer, inp, out, k):
    mask = layer.kept_mask()
    n, count = mask.numel(), expected_count(mask.numel(), k)
    assert int(mask.sum()) == count
    # The kept entries are the largest |score| (scores are continuous: no ties, one answer).
    magnitude = layer.scores.detach().abs()
    if count < n:
        assert magnitude[mask].min() > magnitude[~mask].max()
    if k * n >= 0.5:  # the kept fraction is k, to within rounding (else clamped to one entry)
        assert abs(count / n - k) <= 0.5 / n + 1e-12
    ref = reference_output(layer, inp, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()) + 1e-6)


@pytest.mark.parametrize(
    "k,make",
    [
        (0.5, lambda k: PopupConv2d(1, 1, (1, 5), keep=k)),  # k*n = 2.5 -> 3 (not banker's 2)
        (0.3, lambda k: PopupConv2d(1, 1, (1, 5), keep=k)),  # 1.5 -> 2
        (0.25, lambda k: PopupConv2d(2, 1, (1, 5), keep=k)),  # 2.5 -> 3
        (0.05, lambda k: PopupConv2d(2, 1, (1, 5), keep=k)),  # 0.5 -> 1
        (0.01, lambda k: PopupLinear(7, 3, keep=k)),  # 0.21 -> 0, clamped to 1
        (0.5, lambda k: PopupLinear(7, 3, keep=k)),  # 10.5 -> 11
    ],
)
def test_layer_forward_keeps_round_half_up_k_n_largest_abs_scores(k, make):
    torch.manual_seed(0)
    layer = make(k)
    with torch.no_grad():  # signed scores: the choice is by |score|, not by score
        layer.scores.normal_()
    fan = layer.weight.shape[1]
    x = torch.randn(4, fan) if isinstance(layer, PopupLinear) else torch.randn(4, fan, 3, 7)
    assert_forward_uses_top_scores(layer, x, layer(x), k)


def popup_resnet(k: float = 0.3):
    torch.manual_seed(0)
    return build_model(
        "resnet50_popup", layers=[1, 1, 1, 1], width_per_group=8, num_classes=10, stem="small",
        keep=k,
    )  # fmt: skip


def popup_layers(model):
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, (PopupConv2d, PopupLinear))
    ]


def test_popup_resnet_every_layer_keeps_top_k_by_abs_score_in_its_forward():
    model = popup_resnet()
    layers = popup_layers(model)
    assert len(layers) == 1 + 3 * 4 + 4 + 1  # stem, 3 per bottleneck, 4 downsamples, fc
    seen = {}
    hooks = [
        m.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, (i[0], o)))
        for name, m in layers
    ]
    with torch.no_grad():
        for _, m in layers:  # signed random scores (the init draws U(-1, 1) too)
            m.scores.uniform_(-1.0, 1.0)
        model.eval()(torch.randn(2, 3, 8, 8))
    for h in hooks:
        h.remove()
    assert set(seen) == {name for name, _ in layers}
    for name, m in layers:
        assert m.keep == 0.3, name
        inp, out = seen[name]
        assert_forward_uses_top_scores(m, inp, out, 0.3)
