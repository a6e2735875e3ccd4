"""DNW's backward pass on tiny graphs, checked numerically, and the paper's swap claim (§2.2).

All in float64 so that analytic and finite-difference values agree to many digits.
"""

import copy

import torch

from rwdet.graphs import GraphSpec
from rwdet.models.mobilenet_dnw import NeuralGraph
from rwdet.nn import GraphStage
from rwdet.nn.learned_gates import DNWGates, FixedGates


def tiny_stage(seed=0):
    torch.manual_seed(seed)
    spec = GraphSpec.generate("ws", 5, seed, k=2, p=0.5)  # 5 real edges of 10 candidates
    stage = GraphStage(spec, 2, 3, stride=1, node_op="conv", gates=DNWGates(spec)).double()
    return stage


def frozen_copy(stage, values):
    """The same stage with constant gates: the plain masked forward, ordinary autograd."""
    ref = copy.deepcopy(stage)
    ref.gates = FixedGates(stage.gates.edges, values.detach()).double()
    return ref


def loss_of(stage, x, target):
    return ((stage(x) - target) ** 2).sum()


def record_states(stage):
    """Hooks recording Z_v (node outputs) and I_v (node inputs, with gradients retained)."""
    Z, I, hooks = {}, {}, []
    for v, node in enumerate(stage.nodes):

        def pre(mod, args, v=v):
            if args[0].requires_grad:
                args[0].retain_grad()
            I[v] = args[0]

        def post(mod, args, out, v=v):
            Z[v] = out

        hooks += [node.register_forward_pre_hook(pre), node.register_forward_hook(post)]
    return Z, I, hooks


def test_every_edge_receives_z_u_dot_dl_di_v_and_hallucinated_ones_are_included():
    stage = tiny_stage()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    target = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    Z, I, hooks = record_states(stage)
    loss_of(stage, x, target).backward()
    for h in hooks:
        h.remove()
    kept = stage.gates.kept_mask()
    assert int(kept.sum()) == 5 and int((~kept).sum()) == 5
    grad = stage.gates.weight.grad
    nonzero_hallucinated = 0
    for e, (u, v) in enumerate(stage.gates.edges):
        expected = (
            (Z[u] * I[v].grad).sum().detach()
        )  # <Z_u, dL/dI_v>; SGD adds alpha * <Z_u, -dL/dI_v>
        torch.testing.assert_close(grad[e], expected, rtol=1e-12, atol=1e-12)
        if not kept[e] and abs(float(expected)) > 1e-6:
            nonzero_hallucinated += 1
    assert nonzero_hallucinated >= 2


def test_hallucinated_gradient_matches_finite_differences_of_adding_the_edge():
    stage = tiny_stage(seed=1)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    target = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    loss_of(stage, x, target).backward()
    values = stage.gates().detach()
    kept = stage.gates.kept_mask()
    fed = {v for (_, v), k in zip(stage.gates.edges, kept.tolist()) if k}
    eps = 1e-6
    # A node with no real parent has I_v = 0, at the kink of its ReLU: no derivative to check.
    hallucinated = [
        e for e in torch.nonzero(~kept).flatten().tolist() if stage.gates.edges[e][1] in fed
    ]
    assert len(hallucinated) >= 2
    for e in hallucinated:
        plus, minus = values.clone(), values.clone()
        plus[e], minus[e] = eps, -eps
        with torch.no_grad():
            numeric = (
                loss_of(frozen_copy(stage, plus), x, target)
                - loss_of(frozen_copy(stage, minus), x, target)
            ) / (2 * eps)
        torch.testing.assert_close(stage.gates.weight.grad[e], numeric, rtol=1e-6, atol=1e-8)


def test_upstream_gradients_flow_only_through_real_edges():
    stage = tiny_stage(seed=2)
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    loss_of(stage, x, target).backward()
    ref = frozen_copy(stage, stage.gates())
    x_ref = x.detach().clone().requires_grad_(True)
    ref.zero_grad()
    loss_of(ref, x_ref, target).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=0)
    for (name, p), (_, q) in zip(stage.nodes.named_parameters(), ref.nodes.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_neural_graph_dnw_gradients_and_impossible_entries():
    torch.manual_seed(0)
    g = NeuralGraph([3, 4, 4, 2], budget=12, stride=2, wiring="dnw").double().eval()
    with torch.no_grad():  # impossible entries get the largest magnitudes: still never chosen
        g.weight[~g.allowed] = 50.0
        for op in g.ops:  # BN(0) != 0, so no node sits at its ReLU's kink
            op[0].running_mean.uniform_(-1, 1)
            op[0].running_var.uniform_(0.5, 2)
            op[0].bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    target = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    loss = ((g(x) - target) ** 2).sum()
    loss.backward()
    kept = g.kept_mask()
    assert int(kept.sum()) == 12 and not (kept & ~g.allowed).any()
    assert (g.weight.grad[~g.allowed] == 0).all()
    w_eff = g.effective_weight().detach()
    hallucinated = torch.nonzero(g.allowed & ~kept).tolist()
    assert len(hallucinated) > 10
    eps = 1e-6

    def loss_with(w, inp):
        g.effective_weight = lambda: w  # the plain masked forward, ordinary autograd
        try:
            return ((g(inp) - target) ** 2).sum()
        finally:
            del g.effective_weight

    for r, c in hallucinated[::4]:
        plus, minus = w_eff.clone(), w_eff.clone()
        plus[r, c], minus[r, c] = eps, -eps
        with torch.no_grad():
            numeric = (loss_with(plus, x) - loss_with(minus, x)) / (2 * eps)
        torch.testing.assert_close(g.weight.grad[r, c], numeric, rtol=1e-6, atol=1e-8)
    # Gradient to the inputs equals that of the plain masked forward.
    x3 = x.detach().clone().requires_grad_(True)
    loss_with(w_eff, x3).backward()
    torch.testing.assert_close(x.grad, x3.grad, rtol=0, atol=0)


def _swap_setup(seed):
    """A tiny stage whose update swaps hallucinated edge h in for real edge j (same target)."""
    stage = tiny_stage(seed).eval()  # eval: node states depend on the input only
    for p in stage.nodes.parameters():
        p.requires_grad_(False)  # Algorithm 1 line 10: only the edge weights move
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    target = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    edges = stage.gates.edges
    real = set(stage.spec.edges)
    s = 1e-3  # j and h are small, so swapping them moves I_v a little (Taylor regime)
    w = torch.tensor([1.0 if e in real else 0.0 for e in edges], dtype=torch.float64)
    w *= torch.where(torch.rand(len(edges)) < 0.5, -1.0, 1.0).double()

    def grad_at(wv):
        stage.gates.weight.data.copy_(wv)
        stage.gates.weight.grad = None
        loss_of(stage, x, target).backward()
        return stage.gates.weight.grad.clone()

    for j, (_, v) in enumerate(edges):
        if edges[j] not in real:
            continue
        w1 = w.clone()
        w1[j] = s
        g = grad_at(w1)
        if g[j] < 0:  # choose j's sign so that the update shrinks it
            w1[j] = -s
            g = grad_at(w1)
        if g[j] * w1[j] <= 0:
            continue
        into_v = [e for e, (_, t) in enumerate(edges) if t == v and edges[e] not in real]
        for h in sorted(into_v, key=lambda e: -abs(float(g[e]))):
            if abs(float(g[h])) < 1e-8:
                continue
            alpha = 0.1 * s / (abs(float(g[j])) + abs(float(g[h])))
            new_j = abs(float(w1[j] - alpha * g[j]))
            w2 = w1.clone()
            w2[h] = -torch.sign(g[h]) * (new_j - alpha * abs(float(g[h])) / 2)
            yield stage, x, target, w2, g, alpha, j, h


def test_swap_claim_loss_decreases_when_a_hallucinated_edge_enters():
    checked = 0
    for seed in range(8):
        if checked >= 3:
            break
        for stage, x, target, w, g, alpha, j, h in _swap_setup(seed):
            stage.gates.weight.data.copy_(w)
            old_mask = stage.gates.kept_mask()
            assert old_mask[j] and not old_mask[h]
            with torch.no_grad():
                before = loss_of(stage, x, target)
                stage.gates.weight.data.copy_(w - alpha * g)  # the update rule, every edge
                new_mask = stage.gates.kept_mask()
                if not (new_mask[h] and not new_mask[j] and int((new_mask != old_mask).sum()) == 2):
                    continue  # another edge crossed too: not the claim's setting
                after_swap = loss_of(stage, x, target)  # A: the new choice
                no_swap = loss_of(frozen_copy(stage, stage.gates.weight * old_mask), x, target)
            assert after_swap < before
            assert after_swap < no_swap  # A is better than B (eq. 4-6)
            checked += 1
            break
    assert checked >= 3
