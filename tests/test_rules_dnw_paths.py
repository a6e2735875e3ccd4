"""DNW's rules on every execution path (issue #18): tests that fail when a paper's rule breaks.

DNW (Wortsman et al. 2019, §2.2 and Algorithm 1):

- forward: only the real edges, the ``k`` largest ``|w|`` (exactly ``k``, ties included);
- backward: *every* candidate edge ``(u, v)``, real or hallucinated, gets
  ``dL/dw_uv = <Z_u, dL/dI_v>``; the gradient flows *through* real edges only (a parent's
  ``Z_u`` receives ``w_uv * dL/dI_v`` from real edges alone).

``GraphStage`` has three execution paths — reference (node by node), per-node recompute and the
fused sepconv op (``rwdet.nn.fused``, with its own backward) — and MobileNet-DNW's
``NeuralGraph`` has its own. Each is checked here in float64 against an explicit computation
written independently of the library: plain autograd on the same weights, with the gate values
the stage actually used held constant, recording ``Z_u`` and ``dL/dI_v``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_equivalence import fused_node
from torch import nn

from rwdet.graphs import GraphSpec
from rwdet.models.mobilenet_dnw import NeuralGraph
from rwdet.nn import GraphStage
from rwdet.nn.fused import fusable
from rwdet.nn.learned_gates import DNWGates

PATHS = {path: {"execution": path} for path in ("reference", "recompute", "fused")}
TOL = {"rtol": 1e-9, "atol": 1e-11}


# --------------------------------------------------------------------------------------------
# RandWire-DNW stages


def dnw_stage(path: str, seed: int = 0) -> GraphStage:
    """A 6-node sepconv DNW stage (15 candidates, budget = the WS graph's edge count). The first
    real edges are the generator's graph, so that the sink (node 5) is fed and gradients live."""
    torch.manual_seed(seed)
    spec = GraphSpec.generate("ws", 6, seed, k=2, p=0.5)
    gates = DNWGates(spec, init="generator")
    stage = GraphStage(spec, 2, 3, stride=2, node_op="sepconv", gates=gates, **PATHS[path])
    stage.double().train()
    with torch.no_grad():
        for m in stage.modules():
            if isinstance(m, nn.BatchNorm2d):  # away from the (1, 0) init
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-1.0, 1.0)
    assert stage.gates.budget == len(spec.edges) < len(stage.gates.edges)
    return stage


def explicit_stage(stage: GraphStage, x: torch.Tensor, gates: torch.Tensor):
    """The stage by hand: ``I_v = sum_e gates[e] Z_u`` over the candidate edges (the gate values
    are constants), ``Z_v = BN(pw(dw(relu(I_v))))`` with batch statistics, output = mean of the
    sinks. Uses detached copies of the node parameters. Returns (out, Z, I, params)."""
    edges = stage.gates.edges
    n = len(stage.nodes)
    params = {k: p.detach().clone().requires_grad_() for k, p in stage.nodes.named_parameters()}
    Z, I = {}, {}
    for v in range(n):
        bn = stage.nodes[v][3]
        ins = [(e, u) for e, (u, t) in enumerate(edges) if t == v]
        if ins:
            i_v = sum(gates[e] * Z[u] for e, u in ins)
            if i_v.requires_grad:
                i_v.retain_grad()
            stride = 1
        else:
            i_v, stride = x, stage.stride
        I[v] = i_v
        dw = params[f"{v}.1.weight"]
        b = F.conv2d(F.relu(i_v), dw, stride=stride, padding=1, groups=dw.shape[0])
        c = F.conv2d(b, params[f"{v}.2.weight"])
        Z[v] = F.batch_norm(
            c, None, None, params[f"{v}.3.weight"], params[f"{v}.3.bias"], True, 0.0, bn.eps
        )
    sinks = [v for v in range(n) if not any(u == v for u, _ in edges)]
    out = sum(Z[s] for s in sinks) / len(sinks)
    return out, Z, I, params


def run_step(stage: GraphStage, path: str, x: torch.Tensor, target: torch.Tensor):
    """One forward + backward of ``stage``; asserts the path asked for is the one that ran.
    Returns the gate values the forward used, the loss and the input's gradient."""
    used, calls, reruns = [], [0] * len(stage.nodes), [0] * len(stage.nodes)
    hooks = [stage.gates.register_forward_hook(lambda m, i, o: used.append(o.detach().clone()))]
    for v, node in enumerate(stage.nodes):

        def count(m, i, o, v=v):
            calls[v] += 1

        hooks.append(node.register_forward_hook(count))
    run_node = stage.run_node  # what the recompute path checkpoints (module hooks stay silent
    # while torch.utils.checkpoint recomputes, so count the calls here)

    def counted_run_node(v, *args):
        reruns[v] += 1
        return run_node(v, *args)

    stage.run_node = counted_run_node
    stage.zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_()
    y = stage(xg)
    loss = ((y - target) ** 2).sum()
    loss.backward()
    for h in hooks:
        h.remove()
    del stage.run_node
    assert len(used) == 1
    if path == "fused":
        assert all(fusable(op) for op in stage.nodes)
        assert fused_node(y) is not None, "the fused op did not run"
        assert calls == [0] * len(stage.nodes)  # the op runs its nodes inside, without hooks
        assert reruns == [0] * len(stage.nodes)
    else:
        assert fused_node(y) is None
        assert calls == [1] * len(stage.nodes), calls
        # recompute: each node is checkpointed and runs again in backward; reference: neither.
        assert reruns == [2 if path == "recompute" else 0] * len(stage.nodes), reruns
    return used[0], loss.detach(), xg.grad


def check_stage_rules(stage: GraphStage, path: str, x, target, min_hallucinated: int = 2):
    """Exactly k real edges in the forward; DNW's gradient to every edge; flow through real
    edges only. Returns the gates used."""
    gates, loss, x_grad = run_step(stage, path, x, target)
    w = stage.gates.weight.detach()
    k = stage.gates.budget
    kept = gates != 0
    # Forward: exactly k edges, the largest |w|, with their own signed value w_uv.
    assert int(kept.sum()) == k
    assert w.abs()[kept].min() >= w.abs()[~kept].max()
    torch.testing.assert_close(gates[kept], w[kept], rtol=0, atol=0)
    # The explicit computation with those (constant) gate values.
    xe = x.clone().requires_grad_()
    out, Z, I, params = explicit_stage(stage, xe, gates)
    loss_e = ((out - target) ** 2).sum()
    loss_e.backward()
    torch.testing.assert_close(loss, loss_e.detach(), **TOL)
    # Backward TO every candidate edge: dL/dw_uv = <Z_u, dL/dI_v>, hallucinated ones included.
    grad = stage.gates.weight.grad
    assert grad is not None
    informative = 0
    for e, (u, v) in enumerate(stage.gates.edges):
        expected = (Z[u] * I[v].grad).sum().detach()
        torch.testing.assert_close(grad[e], expected, **TOL, msg=f"{path}: edge {(u, v)}")
        if not kept[e] and abs(float(expected)) > 1e-6:
            informative += 1
    assert informative >= min_hallucinated  # the hallucinated edges' check is not vacuous
    # Gradient THROUGH real edges only: the input and every node parameter get the gradient of
    # the plain masked forward (hallucinated edges carry nothing back to their parents).
    torch.testing.assert_close(x_grad, xe.grad, **TOL)
    for name, p in stage.nodes.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, **TOL, msg=f"{path}: {name}")
    return gates


@pytest.mark.parametrize("path", sorted(PATHS))
def test_stage_dnw_gradient_rule_and_exact_budget_every_step(path):
    stage = dnw_stage(path)
    opt = torch.optim.SGD(stage.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    target = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    masks = []
    for _ in range(4):
        gates = check_stage_rules(stage, path, x, target)
        masks.append(gates != 0)
        opt.step()
    # The update rule reaches hallucinated edges: over the steps, the real set changes.
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("ties", ["all equal", "at the boundary"])
def test_stage_exact_budget_and_gradient_rule_with_tied_magnitudes(path, ties):
    stage = dnw_stage(path, seed=1)
    n_edges, k = len(stage.gates.edges), stage.gates.budget
    torch.manual_seed(3)
    sign = torch.where(torch.rand(n_edges) < 0.5, -1.0, 1.0).double()
    if ties == "all equal":
        magnitude = torch.full((n_edges,), 0.7, dtype=torch.float64)
    else:  # k - 2 clear winners, then 4 tied for the last 2 places, then the rest smaller
        magnitude = torch.rand(n_edges, dtype=torch.float64) * 0.3
        order = torch.randperm(n_edges)
        magnitude[order[: k - 2]] = 0.9 + 0.05 * torch.rand(k - 2, dtype=torch.float64)
        magnitude[order[k - 2 : k + 2]] = 0.5
    with torch.no_grad():
        stage.gates.weight.copy_(magnitude * sign)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    target = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    gates = check_stage_rules(stage, path, x, target, min_hallucinated=1)
    if ties == "at the boundary":
        kept = gates != 0
        assert kept[order[: k - 2]].all() and not kept[order[k + 2 :]].any()
        assert int(kept[order[k - 2 : k + 2]].sum()) == 2


def test_explicit_rule_is_the_derivative_of_adding_a_hallucinated_edge():
    """Sanity of the reference itself: <Z_u, dL/dI_v> is the loss's derivative in w_uv at 0."""
    stage = dnw_stage("reference", seed=2)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    target = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    gates, _, _ = run_step(stage, "reference", x, target)
    kept = gates != 0
    checked = 0
    for e in torch.nonzero(~kept).flatten().tolist():
        g = stage.gates.weight.grad[e]
        if abs(float(g)) < 1e-4:
            continue
        eps = 1e-6
        plus, minus = gates.clone(), gates.clone()
        plus[e], minus[e] = eps, -eps
        with torch.no_grad():
            numeric = (
                ((explicit_stage(stage, x, plus)[0] - target) ** 2).sum()
                - ((explicit_stage(stage, x, minus)[0] - target) ** 2).sum()
            ) / (2 * eps)
        torch.testing.assert_close(g, numeric, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked >= 2


# --------------------------------------------------------------------------------------------
# MobileNet-DNW: NeuralGraph (channel-level nodes, one masked pointwise matrix per graph)


def neural_graph(seed: int = 0) -> NeuralGraph:
    torch.manual_seed(seed)
    g = NeuralGraph([3, 4, 4, 2], budget=12, stride=2, wiring="dnw").double().train()
    with torch.no_grad():
        for op in g.ops:
            op[0].weight.uniform_(0.5, 1.5)
            op[0].bias.uniform_(-1, 1)
    return g


def explicit_graph(g: NeuralGraph, x: torch.Tensor, w: torch.Tensor):
    """The graph by hand with constant effective weights ``w``: block j's input nodes
    ``I_j = sum_{i<j} W[rows_j, cols_i] Z_i``, ``Z_j = dw(relu(BN(I_j)))`` (batch statistics).
    Returns (out, Z of all source nodes, I of all target nodes, params)."""
    params = {k: p.detach().clone().requires_grad_() for k, p in g.ops.named_parameters()}
    cols, rows = g.block_slices()
    Zs, Is, inp = [], [], x
    for j in range(len(g.blocks) - 1):
        bn = g.ops[j][0]
        h = F.batch_norm(inp, None, None, params[f"{j}.0.weight"], params[f"{j}.0.bias"], True,
                         0.0, bn.eps)  # fmt: skip
        dw = params[f"{j}.2.weight"]
        Zs.append(F.conv2d(F.relu(h), dw, stride=g.stride if j == 0 else 1, padding=1,
                           groups=g.blocks[j]))  # fmt: skip
        r = rows[j + 1]
        i_next = sum(torch.einsum("rc,bchw->brhw", w[r, cols[i]], Zs[i]) for i in range(j + 1))
        i_next.retain_grad()
        Is.append(i_next)
        inp = i_next
    return Is[-1], torch.cat(Zs, 1), Is, params


def check_graph_rules(g: NeuralGraph, x, target):
    used = []
    effective = g.effective_weight

    def recording():
        w = effective()
        used.append(w.detach().clone())
        return w

    g.effective_weight = recording
    try:
        g.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_()
        loss = ((g(xg) - target) ** 2).sum()
        loss.backward()
    finally:
        del g.effective_weight
    assert len(used) == 1
    w_used, w = used[0], g.weight.detach()
    kept = w_used != 0
    # Forward: exactly budget real edges, all allowed, the largest allowed |w|, signed w.
    assert int(kept.sum()) == g.budget
    assert not (kept & ~g.allowed).any()
    assert w.abs()[kept].min() >= w.abs()[g.allowed & ~kept].max()
    torch.testing.assert_close(w_used[kept], w[kept], rtol=0, atol=0)
    xe = x.clone().requires_grad_()
    out, Z, Is, params = explicit_graph(g, xe, w_used)
    loss_e = ((out - target) ** 2).sum()
    loss_e.backward()
    torch.testing.assert_close(loss.detach(), loss_e.detach(), **TOL)
    # To every allowed entry: <Z_c, dL/dI_r>; impossible entries are no candidates: nothing.
    dI = torch.cat([i.grad for i in Is], 1)
    expected = torch.einsum("brhw,bchw->rc", dI, Z.detach()) * g.allowed
    torch.testing.assert_close(g.weight.grad, expected, **TOL)
    hallucinated = g.allowed & ~kept
    assert int((expected[hallucinated].abs() > 1e-6).sum()) >= 10
    # Through real edges only.
    torch.testing.assert_close(xg.grad, xe.grad, **TOL)
    for name, p in g.ops.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, **TOL, msg=name)
    return kept


def test_neural_graph_dnw_gradient_rule_and_exact_budget_every_step():
    g = neural_graph()
    with torch.no_grad():  # impossible entries get the largest magnitudes: still never chosen
        g.weight[~g.allowed] = 50.0
    opt = torch.optim.SGD(g.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    masks = []
    for _ in range(4):
        masks.append(check_graph_rules(g, x, target))
        opt.step()
    assert any(not torch.equal(masks[0], m) for m in masks[1:])


@pytest.mark.parametrize("ties", ["all equal", "at the boundary"])
def test_neural_graph_exact_budget_with_tied_magnitudes(ties):
    g = neural_graph(seed=1)
    torch.manual_seed(4)
    sign = torch.where(torch.rand(g.weight.shape) < 0.5, -1.0, 1.0).double()
    allowed = torch.nonzero(g.allowed.flatten()).flatten()
    magnitude = torch.full(g.weight.shape, 60.0, dtype=torch.float64)  # impossible: largest
    flat = magnitude.view(-1)
    if ties == "all equal":
        flat[allowed] = 0.7
    else:  # budget - 3 clear winners, 6 tied for the last 3 places, the rest smaller
        order = allowed[torch.randperm(len(allowed))]
        b = g.budget
        flat[order] = torch.rand(len(order), dtype=torch.float64) * 0.3
        flat[order[: b - 3]] = 0.9
        flat[order[b - 3 : b + 3]] = 0.5
    with torch.no_grad():
        g.weight.copy_(magnitude * sign)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    target = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    kept = check_graph_rules(g, x, target).view(-1)
    if ties == "at the boundary":
        assert kept[order[: b - 3]].all() and not kept[order[b + 3 :]].any()
        assert int(kept[order[b - 3 : b + 3]].sum()) == 3
