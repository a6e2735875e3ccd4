"""Tests written to kill the mutants `make mutate` found surviving in the rules' modules.

Each test states a rule of a paper (or of this library's conventions) that the older tests left
open: a mutant of the rule passed them all. docs/testing.md lists the mutants kept as equivalent.
"""

from __future__ import annotations

import random

import networkx as nx
import pytest
import torch
from test_builder import probe_stage

from rwdet.analysis.damage import removed
from rwdet.graphs import (
    GraphSpec,
    expected_edges,
    generators,
    longest_path_length,
    random_dag,
    stage_seed,
)
from rwdet.nn.aggregate import weighted_sum
from rwdet.nn.gates import StaticGates
from rwdet.nn.learned_gates import DNWGates, FixedGates, PopupGates
from rwdet.nn.stage import GraphStage


class ScriptedRandom(random.Random):
    """A ``random.Random`` whose ``random()`` returns scripted values (then repeats the last).

    Boundary draws (exactly ``p``, exactly on a cumulative-degree edge) have probability ~2^-53
    with a real generator, so only a script can pin which side of the boundary a rule takes.
    """

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)
        self.draws = 0

    def random(self):
        value = self.values[min(self.draws, len(self.values) - 1)]
        self.draws += 1
        return value


# --- generators: a draw u in [0, 1) means "yes" iff u < p, so P(yes) is exactly p ---------------


def test_er_joins_a_pair_iff_its_draw_is_below_p():
    # n = 2: one pair draw, then one Fisher-Yates draw.
    assert generators.erdos_renyi(2, 0.25, ScriptedRandom([0.25, 0.0])) == []
    assert generators.erdos_renyi(2, 0.25, ScriptedRandom([0.2499, 0.0])) == [(0, 1)]


def test_ws_rewires_an_edge_iff_its_draw_is_below_p():
    lattice = [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert generators.watts_strogatz(4, 2, 0.5, ScriptedRandom([0.5])) == lattice
    assert generators.watts_strogatz(4, 2, 0.5, ScriptedRandom([0.4999])) != lattice


def test_ws_gives_every_lattice_edge_its_own_draw_even_when_its_node_is_saturated():
    # WS(4, 1) on 5 nodes: the lattice is complete, so no edge can move; still each of the
    # N*K/2 = 10 edges gets its rewiring draw (the stream a later edge sees depends on it).
    rng = ScriptedRandom([0.0])
    assert generators.watts_strogatz(5, 4, 1.0, rng) == generators.complete(5, None)
    assert rng.draws == 10


def test_ba_target_draw_on_a_cumulative_degree_boundary_picks_the_next_node():
    # BA(1) on 3 nodes: node 1 joins node 0; node 2 draws r = u * (1 + 1) over degrees [1, 1].
    # Node c owns [sum of earlier degrees, + degree(c)): r = 1.0 belongs to node 1.
    assert generators.barabasi_albert(3, 1, ScriptedRandom([0.5])) == [(0, 1), (1, 2)]
    assert generators.barabasi_albert(3, 1, ScriptedRandom([0.4999])) == [(0, 1), (0, 2)]


def test_complete_joins_every_pair():
    assert generators.complete(4, None) == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert random_dag("complete", 7, 0).number_of_edges() == 21


# --- dag: the edge counts the papers state, and path length -------------------------------------


def test_expected_edges_are_the_papers_counts_and_match_the_graphs():
    # WS: N*K/2; BA: M*(N-M); complete: N(N-1)/2 (ints); ER: the mean P*N(N-1)/2.
    exact = {("ws", 32, (("k", 6), ("p", 0.75))): 96, ("ba", 32, (("m", 5),)): 135}
    exact[("complete", 9, ())] = 36
    for (gen, n, params), count in exact.items():
        got = expected_edges(gen, n, **dict(params))
        assert got == count and type(got) is int, (gen, got)
        assert random_dag(gen, n, 3, **dict(params)).number_of_edges() == count
    assert expected_edges("er", 11, p=0.3) == 0.3 * 11 * 10 / 2
    assert expected_edges("ba", 9) == 5 * 4 and expected_edges("ws", 10) == 20  # paper defaults


def test_longest_path_counts_edges():
    chain = nx.DiGraph([(0, 1), (1, 2), (2, 5)])
    chain.add_nodes_from(range(7))
    assert longest_path_length(chain) == 3
    empty = nx.DiGraph()
    empty.add_nodes_from(range(4))
    assert longest_path_length(empty) == 0


# --- gates: which edges are active, and edge-popup's fixed weights and scores ------------------

# Node 1 has one parent, node 2 two, node 3 three; the in-degree of each edge's target:
SPEC4 = GraphSpec(n=4, edges=((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)))
INDEG4 = torch.tensor([1.0, 2.0, 3.0, 2.0, 3.0, 3.0])


def test_static_and_fixed_gates_report_their_active_edges():
    assert StaticGates([(0, 1), (0, 2)]).active_edges() == [(0, 1), (0, 2)]
    fixed = FixedGates(SPEC4.edges, torch.tensor([0.5, 0.0, -1.0, 0.0, 2.0, 0.0]))
    assert fixed.active_edges() == [(0, 1), (0, 3), (1, 3)]


def test_dnw_active_edges_are_the_budget_largest_abs_weights():
    gates = DNWGates(SPEC4, budget=2)
    with torch.no_grad():
        gates.weight.copy_(torch.tensor([0.1, -0.9, 0.2, 0.3, 0.8, -0.05]))
    assert gates.active_edges() == [(0, 2), (1, 3)]


def test_popup_active_edges_are_each_nodes_top_k_by_abs_score():
    gates = PopupGates(SPEC4, keep=0.5)  # kept per node: round(k * indeg) >= 1 -> 1, 1, 2
    with torch.no_grad():
        gates.scores.copy_(torch.tensor([-0.1, 0.2, -0.3, 0.9, -0.5, 0.1]))
    assert gates.active_edges() == [(0, 1), (0, 3), (1, 2), (1, 3)]
    expected = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 0.0]) * gates.weight
    assert torch.equal(gates(), expected)


def test_popup_fixed_weights_follow_the_fan_in_rule_and_defaults():
    # signed constant: |w_uv| = 1/sqrt(indeg(v) * k) with scale (the default), else 1/sqrt(indeg).
    default = PopupGates(SPEC4)
    assert default.keep == 0.3 and default.scale is True and default.init == "signed_constant"
    assert torch.allclose(default.weight.abs(), 1.0 / torch.sqrt(INDEG4 * 0.3))
    unscaled = PopupGates(SPEC4, keep=0.5, scale=False)
    assert unscaled.scale is False
    assert torch.allclose(unscaled.weight.abs(), 1.0 / torch.sqrt(INDEG4))
    assert not default.weight.requires_grad


def test_popup_scores_start_uniform_in_minus_one_one():
    torch.manual_seed(0)
    star = GraphSpec(n=401, edges=tuple((u, 400) for u in range(400)))
    scores = PopupGates(star).scores.detach()
    assert scores.min() >= -1.0 and scores.max() <= 1.0
    assert scores.min() < -0.95 and scores.max() > 0.95


# --- aggregation: gates are rounded to the activations' dtype, as on the fused path ------------


def test_weighted_sum_rounds_gates_to_the_activation_dtype_forward_and_backward():
    # The fused stage applies g.to(Z.dtype) (rwdet.nn.fused); the reference op must do the
    # same, or bf16 runs of the two paths differ. 1/3 etc. are not bf16 numbers.
    torch.manual_seed(0)
    zs = [torch.randn(256, dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    w = torch.tensor([1 / 3, 0.7071, 0.123456], requires_grad=True)
    out = weighted_sum(w, zs)
    wb = w.detach().bfloat16()
    expected = zs[0].detach() * wb[0]
    for z, wi in zip(zs[1:], wb[1:]):
        expected.addcmul_(z.detach(), wi)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    grad = torch.randn(256, dtype=torch.bfloat16)
    out.backward(grad)
    for z, wi in zip(zs, wb):
        assert torch.equal(z.grad, grad * wi)
    assert w.grad.dtype == torch.float32


# --- dag: stage seeds ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1.5, "1", True])
def test_stage_seed_refuses_a_seed_that_is_not_an_integer(seed):
    with pytest.raises(ValueError, match="is not an integer"):
        stage_seed(seed, 0)


# --- edge drop: P(drop) is exactly p, and no edge drop means no random draw --------------------


def test_edge_drop_happens_iff_the_draw_is_below_p(monkeypatch):
    gates = StaticGates([(0, 2), (1, 2)], edge_drop=0.25).train()
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(0.25))
    assert torch.equal(gates(), torch.full((2,), 0.5))
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.tensor(0.2499))
    assert (gates() == 0).sum() == 1


@pytest.mark.parametrize(
    "edges,edge_drop",
    [([(0, 2), (1, 2)], 0.0), ([(0, 1), (1, 2)], 0.9)],  # no edge drop; no droppable edge
)
def test_gates_draw_nothing_when_no_edge_can_be_dropped(edges, edge_drop):
    # A run without edge drop must see the same random stream as one without the gates.
    gates = StaticGates(edges, edge_drop=edge_drop).train()
    torch.manual_seed(0)
    for _ in range(20):
        gates()
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))


def test_static_gates_are_built_on_the_parameters_device():
    gates = StaticGates([(0, 2), (1, 2), (1, 3)]).to("meta")
    assert gates().device.type == "meta"


# --- DNW gates: the budget, and Algorithm 1's initialisation -----------------------------------


def test_dnw_budget_may_be_anything_from_one_to_every_candidate():
    assert DNWGates(SPEC4, budget=1).budget == 1
    assert len(DNWGates(SPEC4, budget=6).active_edges()) == 6
    for bad in (0, 7):
        with pytest.raises(ValueError, match=f"budget {bad} is out of range"):
            DNWGates(SPEC4, budget=bad)


def test_dnw_uniform_init_is_uniform_in_minus_one_one_with_random_signs():
    torch.manual_seed(0)
    w = DNWGates(GraphSpec(n=60, edges=((0, 1),))).weight.detach()  # 1770 candidates
    assert w.abs().max() < 1.0 and w.abs().max() > 0.99 and w.abs().min() < 0.01
    assert 0.45 < (w < 0).float().mean() < 0.55


def test_dnw_sign_is_negative_iff_its_draw_is_below_half(monkeypatch):
    # A fair coin from u in [0, 1): "negative iff u < 1/2" has probability exactly 1/2.
    monkeypatch.setattr(torch, "rand", lambda n: torch.full((n,), 0.5))
    assert torch.equal(DNWGates(SPEC4).weight.detach(), torch.full((6,), 0.5))


def test_dnw_generator_init_puts_the_generators_edges_in_half_one_the_rest_below_half():
    torch.manual_seed(0)
    spec = GraphSpec.generate("ws", 60, 1, k=4, p=0.75)
    gates = DNWGates(spec, init="generator")
    w = gates.weight.detach().abs()
    in_graph = torch.tensor([e in set(spec.edges) for e in gates.edges])
    real, rest = w[in_graph], w[~in_graph]
    assert real.min() >= 0.5 and real.max() < 1.0 and real.min() < 0.52 and real.max() > 0.98
    assert rest.max() < 0.5 and rest.max() > 0.49 and rest.min() < 0.01
    assert gates.active_edges() == list(spec.edges)


# --- stage: candidate edges, default stride ----------------------------------------------------


@pytest.mark.parametrize("edge", [(1, 1), (2, 1), (0, 3), (-1, 2)])
def test_stage_refuses_a_candidate_edge_outside_the_dag_rule(edge):
    spec = GraphSpec(n=3, edges=((0, 1),))
    with pytest.raises(ValueError, match=rf"candidate edge \({edge[0]}, {edge[1]}\) is invalid"):
        GraphStage(spec, 2, 2, gates=FixedGates([(0, 1), edge], torch.ones(2)))


def test_stage_names_the_repeated_candidate_edge():
    spec = GraphSpec(n=3, edges=((0, 1),))
    gates = FixedGates([(0, 1), (1, 2), (0, 1)], torch.ones(3))
    with pytest.raises(ValueError, match=r"repeat \[\(0, 1\)\];"):
        GraphStage(spec, 2, 2, gates=gates)


def test_stage_default_stride_halves_the_resolution():
    stage = GraphStage(GraphSpec(n=2, edges=((0, 1),)), 2, 3).eval()
    assert stage(torch.zeros(1, 2, 8, 8)).shape == (1, 3, 4, 4)


def test_a_weighted_edge_left_alone_by_damage_keeps_its_gate():
    # Node 2 has parents 0 and 1 (weighted gates); removing edge (1, 2) leaves the one term
    # gate(0, 2) * Z_0, not Z_0 (only a single-parent node's unit gate may be skipped).
    spec = GraphSpec(n=3, edges=((0, 1), (0, 2), (1, 2)))
    stage = probe_stage(spec)
    gate02 = dict(zip(stage.gates.edges, stage.gates().tolist()))[(0, 2)]
    x = torch.zeros(1, 2, 1, 1)
    with removed(stage, edge=spec.edges.index((1, 2))):
        stage(x)
    assert torch.allclose(stage.nodes[2].seen, torch.full_like(x, gate02 * 1.0))
    assert abs(gate02 - 1.0) > 0.1


# --- parameter checks: exact messages (each names the value and the rule) ---------------------


@pytest.mark.parametrize(
    "gen,n,params,message",
    [
        ("ws", 1, {}, "n=1 is out of range; n must be an integer >= 2 (nodes per stage)"),
        ("ba", 8, {"m": 8}, "m=8 is out of range; m must be an integer with 1 <= m < n=8"),
        ("ws", 8, {"k": 8}, "k=8 is out of range; k must be an even integer with 2 <= k < n=8"),
        ("ws", 8.0, {}, "n=8.0 is not an integer; n must be an integer >= 2 (nodes per stage)"),
        ("ba", 8, {"m": 2.5}, "m=2.5 is not an integer; m must be an integer with 1 <= m < n=8"),
        ("er", 8, {"p": "0.5"}, "p='0.5' is out of range; p must be a probability in [0, 1]"),
        ("er", 8, {"p": True}, "p=True is out of range; p must be a probability in [0, 1]"),
    ],
)
def test_generator_parameter_errors_name_the_value_and_the_rule(gen, n, params, message):
    with pytest.raises(ValueError) as err:
        random_dag(gen, n, 1, **params)
    assert str(err.value).startswith(message)


def test_two_nodes_are_enough_for_a_stage():
    assert list(random_dag("er", 2, 1, p=1.0).edges) == [(0, 1)]


def test_edge_drop_must_be_below_one():
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=f"edge_drop={bad} is out of range"):
            StaticGates([(0, 2), (1, 2)], edge_drop=bad)


def test_index_buffers_stay_out_of_checkpoints():
    # Derived from the graph at build time: a checkpoint holds the graph, not its indices.
    spec = GraphSpec(n=3, edges=((0, 2), (1, 2)))
    keys = GraphStage(spec, 2, 2, node_op="conv").state_dict().keys()
    assert not [k for k in keys if k.endswith(("weighted_index", "in_edge_index"))]


def test_traced_edge_choice_is_the_eager_forward():
    """Under tracing (TorchScript/ONNX export) the edge choice takes its plain-tensor path: the
    same forward as eager, for DNW's weight and popup's mask with and without groups."""
    from rwdet.nn.choose import dnw_weight, popup_mask

    torch.manual_seed(0)
    w = torch.randn(6, 5)
    allowed = torch.rand(6, 5) > 0.3
    for args in ((w, 7), (w, 7, allowed)):
        traced = torch.jit.trace(lambda t, a=args: dnw_weight(t, *a[1:]), (w,), check_trace=False)
        assert torch.equal(traced(w), dnw_weight(*args).detach())
    scores = torch.randn(10)
    groups = [(torch.arange(0, 6), 2), (torch.arange(6, 10), 3)]
    for count, grp in ((4, None), (4, groups)):
        traced = torch.jit.trace(lambda s, c=count, g=grp: popup_mask(s, c, g), (scores,),
                                 check_trace=False)  # fmt: skip
        assert torch.equal(traced(scores), popup_mask(scores, count, grp).detach())
    assert int(popup_mask(scores, 4, groups).sum()) == 5  # the groups' own counts


def test_traced_aggregation_rounds_the_gates_as_eager_does():
    """The export path's sum equals WeightedSum bit for bit, also for bf16/fp16 node outputs
    with float32 gates (both round the gates to the outputs' dtype first)."""
    from rwdet.nn.aggregate import WeightedSum, plain_weighted_sum

    torch.manual_seed(0)
    w = torch.rand(3)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        z = [torch.randn(2, 4, 5, 5).to(dtype) for _ in range(3)]
        assert torch.equal(plain_weighted_sum(w, z), WeightedSum.apply(w, *z))


# ------------------------------------------------- supermask (Zhou et al.): sample, then decide


def test_supermask_mask_samples_in_training_and_decides_in_eval():
    from rwdet.nn.choose import supermask_mask

    scores = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], requires_grad=True)
    torch.manual_seed(0)
    draws = torch.stack([supermask_mask(scores, training=True) for _ in range(400)])
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    freq = draws.mean(0)  # P(1) = sigmoid(score)
    torch.testing.assert_close(freq, torch.sigmoid(scores.detach()), atol=0.08, rtol=0)
    supermask_mask(scores, training=True).sum().backward()  # straight through: d/ds of p
    torch.testing.assert_close(scores.grad, torch.sigmoid(scores) * (1 - torch.sigmoid(scores)))
    s = scores.detach()
    # eval, default "threshold": exactly s > 0 (a score of 0 is sigmoid 0.5: not kept), float
    for mask in (supermask_mask(s, training=False), supermask_mask(s, False, "threshold")):
        assert mask.dtype == s.dtype and mask.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    torch.testing.assert_close(supermask_mask(s, False, "expected"), torch.sigmoid(s))
    torch.manual_seed(1)
    sampled = torch.stack([supermask_mask(s, False, "sample") for _ in range(400)])
    assert set(sampled.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(sampled.mean(0), torch.sigmoid(s), atol=0.08, rtol=0)
    with pytest.raises(ValueError, match=r"eval_mask='mean' is not known; choose one of"):
        supermask_mask(s, False, "mean")


# ------------------------------------------------- wiring factories and old keywords


def test_wiring_factories_refuse_edge_drop_and_pass_their_options():
    from rwdet.nn import get_wiring

    spec = GraphSpec.generate("ws", 8, 1, k=4, p=0.5)
    for name in ("dnw", "popup"):
        with pytest.raises(ValueError, match=rf"not defined for wiring='{name}'; pass edge_drop=0"):
            get_wiring(name).make_gates(spec, 0.1)
    gates = get_wiring("dnw", init="generator").make_gates(spec, 0.0)
    assert gates.init == "generator"
    with pytest.raises(Exception, match=r"^PopupGates: k=0.5 is no longer the fraction kept"):
        PopupGates(spec, k=0.5)


def test_stage_refuses_old_keywords_and_keeps_its_name():
    spec = GraphSpec.generate("ws", 6, 1, k=2, p=0.5)
    assert (
        GraphStage(spec, 2, 3).name == "" and GraphStage(spec, 2, 3, name="conv3").name == "conv3"
    )
    for key in ("fused", "recompute"):
        with pytest.raises(TypeError, match=rf"^{key}=True: the keyword is now execution="):
            GraphStage(spec, 2, 3, **{key: True})
    with pytest.raises(ValueError, match=r"^GraphStage\(6 nodes, 2->3 channels\): execution="):
        GraphStage(spec, 2, 3, node_op="conv", execution="fused")  # refused when built


# ------------------------------------------------- forwards autograd does not record


def test_accumulate_into_first_writes_the_first_input():
    from rwdet.nn.aggregate import accumulate

    z = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    w = torch.tensor([0.5, 2.0, -1.0]).unbind()
    expected = z[0] * w[0] + z[1] * w[1] + z[2] * w[2]
    fresh = accumulate([t.clone() for t in z], w)
    first = z[0].clone()
    reused = accumulate([first, z[1], z[2]], w, into_first=True)
    assert reused.data_ptr() == first.data_ptr() and fresh.data_ptr() != z[0].data_ptr()
    torch.testing.assert_close(reused, expected), torch.testing.assert_close(fresh, expected)


def test_unrecorded_forward_aggregates_into_parents_at_their_last_use():
    from test_equivalence import _OpCounter

    torch.manual_seed(0)
    stage = GraphStage(GraphSpec.generate("ws", 12, 3, k=4, p=0.75), 3, 6, stride=2).eval()
    multi = [v for v in range(12) if len(stage.in_edges[v]) > 1]
    reuse = [v for v in multi if stage.last_use.get(stage.in_edges[v][0][1]) == v]
    assert reuse and len(reuse) < len(multi)  # both kinds occur: a real test
    counter = _OpCounter()
    with counter, torch.no_grad():
        stage(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))
    assert counter.calls.count("mul_.Tensor") == len(reuse)
    assert counter.calls.count("mul.Tensor") == len(multi) - len(reuse)


def test_traced_stage_is_not_computed_in_place_or_relaid():
    """Tracers (fvcore's FLOP count, ONNX export) see the reference ops: no in-place ReLU
    inputs and no layout copies in the graph."""
    torch.manual_seed(0)
    stage = GraphStage(GraphSpec.generate("ws", 8, 3, k=4, p=0.75), 3, 6, stride=2).eval()
    with torch.no_grad():
        graph = str(torch.jit.trace(stage, torch.randn(2, 3, 8, 8)).graph)
    assert "aten::relu_" not in graph and "aten::mul_" not in graph
    assert "aten::contiguous" not in graph


def test_a_global_hook_keeps_node_outputs_as_it_saw_them():
    from torch.nn.modules.module import register_module_forward_hook

    torch.manual_seed(0)
    stage = GraphStage(GraphSpec.generate("ws", 10, 3, k=4, p=0.75), 3, 6, stride=2).eval()
    norms = {id(n[3]) for n in stage.nodes}
    kept = []

    def hook(module, inputs, output):
        if id(module) in norms:
            kept.append((output, output.clone()))

    handle = register_module_forward_hook(hook)
    try:
        with torch.no_grad():
            stage(torch.randn(2, 3, 8, 8))
    finally:
        handle.remove()
    assert len(kept) == 10 and all(torch.equal(o, c) for o, c in kept)


def test_a_removed_single_in_edge_gives_its_node_a_zero_input():
    """Graph damage: removing a node's only in-edge zeroes its input, whatever index its parent
    has (the unit-edge shortcut is keyed by edge, not by parent)."""
    for seed in range(50):
        stage = GraphStage(GraphSpec.generate("ws", 10, seed, k=4, p=0.75), 3, 6).eval()
        case = [
            (v, ins[0][0])
            for v, ins in enumerate(stage.in_edges)
            if len(ins) == 1 and ins[0][1] in stage.gates.unit_edges - {ins[0][0]}
        ]
        if case:
            break
    v, e = case[0]
    seen = []
    stage.nodes[v].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with removed(stage, edge=e), torch.no_grad():
        stage(torch.randn(2, 3, 8, 8))
    assert len(seen) == 1 and not seen[0].any()


def test_supermask_sample_traces_as_a_plain_bernoulli():
    """Tracers cannot record the straight-through op: under tracing the sample is a plain
    Bernoulli(sigmoid) draw (exported models with eval_mask='sample' keep sampling)."""
    from rwdet.nn.choose import supermask_mask

    class Sample(torch.nn.Module):
        def forward(self, scores):
            return supermask_mask(scores, training=False, eval_mask="sample")

    scores = torch.tensor([-30.0, 30.0, 0.0])
    traced = torch.jit.trace(Sample(), scores, check_trace=False)
    assert "aten::bernoulli" in str(traced.graph)
    out = traced(scores)
    assert out[0] == 0 and out[1] == 1 and out[2] in (0, 1)
