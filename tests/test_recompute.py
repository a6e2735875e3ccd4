"""Optimised execution paths give the reference path's outputs, gradients and BN statistics."""

import copy

import pytest
import torch

from rwdet.graphs import GraphSpec
from rwdet.models import build_model
from rwdet.nn import GraphStage


@pytest.mark.parametrize(
    "gen,params", [("er", {"p": 0.3}), ("ba", {"m": 3}), ("ws", {"k": 4, "p": 0.75})]
)
def test_recompute_stage_matches_reference(gen, params):
    torch.manual_seed(0)
    spec = GraphSpec.generate(gen, 10, 3, **params)
    ref = GraphStage(spec, 3, 6, stride=2)
    opt = copy.deepcopy(ref)
    opt.recompute = True
    with torch.no_grad():
        ref.gates.weight.normal_()
        opt.gates.weight.copy_(ref.gates.weight)
    x = torch.randn(4, 3, 12, 12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ref(xa), opt(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-6)
    for (name, pa), (_, pb) in zip(ref.named_parameters(), opt.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    # Running statistics updated exactly once, as in the reference.
    for (name, ba), (_, bb) in zip(ref.named_buffers(), opt.named_buffers()):
        torch.testing.assert_close(ba, bb, rtol=1e-5, atol=1e-7, msg=name)


def test_recompute_model_matches_reference_with_edge_drop():
    kw = {"channels": 8, "nodes": 10, "stem": "small", "head_channels": 16, "edge_drop": 0.5}
    torch.manual_seed(0)
    ref = build_model("randwire_c109", **kw)
    opt = build_model("randwire_c109", recompute=True, **kw)
    opt.load_state_dict(ref.state_dict())
    ref.train(), opt.train()
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(5)
    la = ref(x).square().mean()
    torch.manual_seed(5)
    lb = opt(x).square().mean()
    torch.testing.assert_close(la, lb)
    la.backward(), lb.backward()
    for (name, pa), (_, pb) in zip(ref.named_parameters(), opt.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_weighted_sum_matches_naive_and_gradcheck():
    from rwdet.nn.aggregate import weighted_sum

    torch.manual_seed(0)
    w = torch.randn(3, dtype=torch.double, requires_grad=True)
    zs = [torch.randn(2, 3, 4, 4, dtype=torch.double, requires_grad=True) for _ in range(3)]
    naive = sum(wi * z for wi, z in zip(w, zs))
    torch.testing.assert_close(weighted_sum(w, zs), naive)
    assert torch.autograd.gradcheck(lambda w, *z: weighted_sum(w, list(z)), (w, *zs))
    # channels_last inputs take the dot-product path without copies and agree too.
    zc = [z.detach().to(memory_format=torch.channels_last).requires_grad_() for z in zs]
    assert torch.autograd.gradcheck(lambda w, *z: weighted_sum(w, list(z)), (w, *zc))
