"""edge-popup layers: fixed weights never move, exact top-k, initialisations, score gradients."""

import math

import pytest
import torch
from torch import nn

from rwdet.models import build_model
from rwdet.nn.sparse_layers import PopupConv2d, PopupLinear, nonaffine_batchnorm


def test_popup_weights_bit_identical_after_sgd_with_momentum_and_weight_decay():
    torch.manual_seed(0)
    model = nn.Sequential(
        PopupConv2d(3, 8, 3, padding=1, keep=0.5),
        nonaffine_batchnorm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        PopupLinear(8, 4, keep=0.5),
    )
    fixed = [m.weight.detach().clone() for m in (model[0], model[5])]
    scores = [m.scores.detach().clone() for m in (model[0], model[5])]
    masks = [m.kept_mask().clone() for m in (model[0], model[5])]
    # Every parameter handed to the optimizer, as a careless trainer would: the fixed weights
    # must still not move (no gradient means no momentum and no weight decay update either).
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for m, w, s in zip((model[0], model[5]), fixed, scores):
        assert torch.equal(m.weight, w)  # bit-identical
        assert m.weight.grad is None and not m.weight.requires_grad
        assert not torch.equal(m.scores, s)
    assert any(not torch.equal(m.kept_mask(), mask) for m, mask in zip((model[0], model[5]), masks))


@pytest.mark.parametrize("k", [0.05, 0.3, 0.5, 0.7, 1.0])
def test_exactly_round_k_n_kept_per_layer_even_with_tied_scores(k):
    conv = PopupConv2d(4, 6, 3, keep=k)
    n = conv.weight.numel()  # 216
    expected = max(1, math.floor(k * n + 0.5))
    assert int(conv.kept_mask().sum()) == expected
    with torch.no_grad():
        conv.scores.fill_(0.25)  # every score tied
    assert int(conv.kept_mask().sum()) == expected
    w_eff = conv.masked_weight()
    assert int((w_eff != 0).sum()) == expected


@pytest.mark.parametrize("init", ["kaiming_normal", "signed_constant"])
@pytest.mark.parametrize("scale", [False, True])
def test_fixed_weight_initialisations(init, scale):
    torch.manual_seed(0)
    k = 0.3
    conv = PopupConv2d(64, 128, 3, keep=k, init=init, scale=scale)
    fan_in = 64 * 9
    std = math.sqrt(2.0 / fan_in) / (math.sqrt(k) if scale else 1.0)
    w = conv.weight
    if init == "signed_constant":
        assert torch.allclose(w.abs(), torch.full_like(w, std))
        assert abs(float((w > 0).float().mean()) - 0.5) < 0.02
    else:
        assert abs(float(w.std()) / std - 1) < 0.02 and abs(float(w.mean())) < 0.02 * std


def test_score_gradient_is_straight_through():
    torch.manual_seed(0)
    lin = PopupLinear(5, 3, keep=0.4)
    x = torch.randn(7, 5)
    out = lin(x)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    # Reference: gradient w.r.t. the effective weight of a plain linear layer.
    w_eff = lin.masked_weight().detach().requires_grad_(True)
    torch.nn.functional.linear(x, w_eff).backward(upstream)
    expected = w_eff.grad * lin.weight * torch.sign(lin.scores.detach())
    torch.testing.assert_close(lin.scores.grad, expected)
    assert (lin.scores.grad[~lin.kept_mask()] != 0).any()  # unchosen weights can pop up


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="fraction of weights KEPT"):
        PopupConv2d(3, 3, 3, keep=30)
    with pytest.raises(ValueError, match="init='xavier'"):
        PopupConv2d(3, 3, 3, init="xavier")
    with pytest.raises(ValueError, match="bias=False"):
        PopupConv2d(3, 3, 3, bias=True)
    with pytest.raises(ValueError, match="bias=False"):
        PopupLinear(3, 3, bias=True)
    with pytest.raises(ValueError, match="edge_drop"):
        build_model("randwire_small", channels=4, nodes=6, wiring="popup", edge_drop=0.1)


def test_randwire_popup_learns_only_scores_and_has_no_affine_bn():
    model = build_model(
        "randwire_small", channels=8, nodes=6, wiring="popup", num_classes=5, stem="small",
        wiring_options={"keep": 0.5, "init": "kaiming_normal", "scale": False},
    )  # fmt: skip
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("scores") for n in trainable)
    # Scores on every conv weight, on the classifier and on every stage's aggregation edges.
    assert "fc.scores" in trainable
    assert {"conv3.gates.scores", "conv4.gates.scores", "conv5.gates.scores"} <= set(trainable)
    assert all(
        not m.affine for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    )
    assert all(
        m.keep == 0.5 and m.init == "kaiming_normal"
        for m in model.modules()
        if hasattr(m, "scores")
    )
    # Aggregation edges: each node's in-edges are one layer; every node keeps at least one.
    gates = model.conv4.gates
    kept = gates.kept_mask()
    for v in {v for _, v in gates.edges}:
        into = [e for e, (_, t) in enumerate(gates.edges) if t == v]
        assert int(kept[into].sum()) == max(1, math.floor(0.5 * len(into) + 0.5))


def test_popup_gates_exact_per_node_count_with_ties_and_gradient_to_scores():
    from rwdet.graphs import GraphSpec
    from rwdet.nn.learned_gates import PopupGates

    spec = GraphSpec(
        n=6, edges=((0, 3), (1, 3), (2, 3), (0, 4), (3, 4), (1, 5), (2, 5), (3, 5), (4, 5))
    )
    gates = PopupGates(spec, keep=0.3)
    with torch.no_grad():
        gates.scores.fill_(1.0)  # all tied
    kept = gates.kept_mask()
    # in-degrees 3, 2, 4 -> round(0.9)=1, round(0.6)=1, round(1.2)=1
    assert int(kept.sum()) == 3 == gates.count
    out = gates()
    assert torch.equal(out.detach() != 0, kept)
    upstream = torch.arange(1.0, 10.0)
    out.backward(upstream)
    torch.testing.assert_close(gates.scores.grad, upstream * gates.weight)  # straight through


@pytest.mark.parametrize("init", ["signed_constant", "signed_xavier_constant"])
def test_popup_gates_follow_the_chosen_distribution(init):
    """A RandWire stage's popup edge weights use ``init``'s own fan rule (the Xavier pair's
    std differs from the Kaiming one), not only its shape."""
    from rwdet.graphs import GraphSpec
    from rwdet.nn.learned_gates import PopupGates

    spec = GraphSpec.generate("ws", 32, 1, k=4, p=0.75)
    gates = PopupGates(spec, keep=0.5, init=init, scale=True)
    indeg = {}
    for _, v in gates.edges:
        indeg[v] = indeg.get(v, 0) + 1
    for e, (_, v) in enumerate(gates.edges):
        n = indeg[v]
        want = math.sqrt(2 / ((n + 1) * 0.5)) if "xavier" in init else 1 / math.sqrt(n * 0.5)
        assert abs(abs(gates.weight[e].item()) - want) < 1e-6
