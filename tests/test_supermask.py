"""Zhou et al. supermask layers (rwdet.nn.choose.supermask_mask) and the fixed-weight
distributions of popup/supermask layers (rwdet.nn.inits)."""

import math

import pytest
import torch

from rwdet.nn.choose import supermask_mask
from rwdet.nn.inits import FIXED_INITS
from rwdet.nn.sparse_layers import PopupConv2d, PopupLinear, SupermaskConv2d, SupermaskLinear


def test_training_samples_a_new_mask_each_step_and_eval_is_deterministic():
    torch.manual_seed(0)
    layer = SupermaskLinear(64, 32)
    x = torch.randn(4, 64)
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # a fresh Bernoulli sample per forward pass
    layer.eval()
    c, d = layer(x), layer(x)
    assert torch.equal(c, d)
    # The evaluation mask is the most probable one: p = sigmoid(score) > 0.5.
    expected = x @ (layer.weight * (layer.scores > 0)).T
    torch.testing.assert_close(c, expected)


def test_training_mask_is_bernoulli_of_sigmoid_scores():
    torch.manual_seed(0)
    scores = torch.tensor([-2.0, 0.0, 1.5]).repeat(20000, 1)
    freq = supermask_mask(scores, training=True).mean(0)
    torch.testing.assert_close(freq, torch.sigmoid(scores[0]), atol=0.015, rtol=0)


def test_eval_mask_choices():
    scores = torch.tensor([-1.0, 0.5, 2.0])
    assert supermask_mask(scores, False).tolist() == [0.0, 1.0, 1.0]
    torch.testing.assert_close(supermask_mask(scores, False, "expected"), torch.sigmoid(scores))
    with pytest.raises(ValueError, match="choose one of"):
        supermask_mask(scores, False, "mean")


def test_straight_through_gradient_reaches_scores():
    torch.manual_seed(0)
    layer = SupermaskLinear(5, 3)
    x = torch.randn(4, 5)
    layer(x).sum().backward()
    # d(sum)/d(mask) = w * sum_b x (the mask's own gradient, passed straight through the
    # sample), then through the sigmoid: times p (1 - p).
    p = torch.sigmoid(layer.scores.detach())
    expected = layer.weight * x.sum(0) * p * (1 - p)
    torch.testing.assert_close(layer.scores.grad, expected)
    assert layer.weight.grad is None


def test_supermask_conv_matches_its_masked_weight_in_eval():
    torch.manual_seed(0)
    conv = SupermaskConv2d(3, 4, 3, padding=1).eval()
    x = torch.randn(1, 3, 5, 5)
    ref = torch.nn.functional.conv2d(x, conv.weight * (conv.scores > 0), padding=1)
    torch.testing.assert_close(conv(x), ref)
    with pytest.raises(ValueError, match="bias=False"):
        SupermaskConv2d(3, 4, 3, bias=True)


# ---------------------------------------------------------------- weight distributions

FANS = {"conv": (16 * 9, 48 * 9), "linear": (600, 200)}


def formula_std(init, fan_in, fan_out, k, scale):
    f = k if scale else 1.0
    if init.startswith("xavier") or init == "signed_xavier_constant":
        return math.sqrt(2.0 / (f * (fan_in + fan_out)))
    return math.sqrt(2.0 / (f * fan_in))


@pytest.mark.parametrize("init", FIXED_INITS)
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("kind", ["popup", "supermask"])
def test_every_init_has_its_formula_std(init, scale, kind):
    torch.manual_seed(0)
    k = 0.3
    if kind == "popup":
        conv = PopupConv2d(16, 48, 3, keep=k, init=init, scale=scale)
        lin = PopupLinear(600, 200, keep=k, init=init, scale=scale)
    else:
        conv = SupermaskConv2d(16, 48, 3, keep=k, init=init, scale=scale)
        lin = SupermaskLinear(600, 200, keep=k, init=init, scale=scale)
    for name, layer in (("conv", conv), ("linear", lin)):
        w = layer.weight
        std = formula_std(init, *FANS[name], k, scale)
        assert abs(w.std().item() / std - 1) < 0.03, (name, w.std().item(), std)
        assert abs(w.mean().item()) < 0.05 * std
        if "signed" in init:
            torch.testing.assert_close(w.abs(), torch.full_like(w, std))
        if init == "kaiming_uniform":
            assert w.abs().max() <= std * math.sqrt(3) and w.abs().max() > 0.99 * std * 1.7


def test_unknown_init_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of.*signed_xavier_constant"):
        PopupLinear(4, 4, init="orthogonal")
    with pytest.raises(ValueError, match="choose one of.*kaiming_uniform"):
        SupermaskLinear(4, 4, init="uniform")


def test_export_freezes_the_evaluation_mask():
    """``export_subnetwork`` (what tools/export.py traces) turns supermask layers into plain
    ones holding the evaluation mask, even from a model left in training mode; a model that
    samples at evaluation has no one subnetwork and is refused."""
    from rwdet.models import build_model
    from rwdet.nn.export import export_subnetwork
    from rwdet.nn.sparse_layers import SupermaskConv2d, SupermaskLinear

    torch.manual_seed(0)
    model = build_model("conv2", wiring="supermask", width=0.25, num_classes=10).train()
    plain = export_subnetwork(model)
    assert model.training and not any(
        isinstance(m, (SupermaskConv2d, SupermaskLinear)) for m in plain.modules()
    )
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.eval()(x))
    sampling = build_model("conv2", wiring="supermask", width=0.25, eval_mask="sample")
    with pytest.raises(ValueError, match="eval_mask='sample'"):
        export_subnetwork(sampling)
