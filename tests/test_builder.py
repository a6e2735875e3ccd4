"""GraphStage on hand-made graphs, including regressions for bugs of public reimplementations."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from rwdet.graphs import GraphSpec
from rwdet.models import build_model, get_graphs, stage_outputs
from rwdet.nn import GraphStage, StaticGates, build_node_op


class Probe(nn.Module):
    """Stands in for a node op: records its input, returns input + a node-specific constant."""

    def __init__(self, offset):
        super().__init__()
        self.offset = offset
        self.seen = None

    def forward(self, x):
        self.seen = x.detach().clone()
        return x + self.offset


def probe_stage(spec, edge_drop=0.0):
    stage = GraphStage(spec, 2, 2, stride=1, gates=StaticGates(spec.edges, edge_drop))
    for v in range(spec.n):
        stage.nodes[v] = Probe(float(10**v))
    with torch.no_grad():
        stage.gates.weight.copy_(torch.linspace(-2.0, 2.0, len(stage.gates.weight)))
    return stage


def gate_of(stage, edge):
    return dict(zip(stage.gates.edges, stage.gates().tolist()))[edge]


def test_aggregates_parents_not_ancestors():
    # Chain 0 -> 1 -> 2: node 2 must see only Z_1, never Z_0.
    stage = probe_stage(GraphSpec(n=3, edges=((0, 1), (1, 2))))
    x = torch.zeros(1, 2, 1, 1)
    out = stage(x)
    assert torch.allclose(stage.nodes[2].seen, torch.full_like(x, 1 + 10))
    assert torch.allclose(out, torch.full_like(x, 1 + 10 + 100))


def test_weighted_sum_over_all_parents_with_sigmoid_weights():
    # Node 2 has parents 0 and 1; its input is sigmoid(w02) Z0 + sigmoid(w12) Z1 (not Z0 alone).
    spec = GraphSpec(n=3, edges=((0, 2), (1, 2)))
    stage = probe_stage(spec)
    x = torch.zeros(1, 2, 1, 1)
    stage(x)
    w = stage.gates.weight.detach()
    expected = torch.sigmoid(w[0]) * 1 + torch.sigmoid(w[1]) * 10
    assert torch.allclose(stage.nodes[2].seen, torch.full_like(x, expected.item()))
    # Positive weights even for a very negative parameter (the sigmoid is there).
    with torch.no_grad():
        stage.gates.weight.fill_(-30.0)
    assert (stage.gates() > 0).all()


def test_single_input_nodes_carry_no_weight():
    spec = GraphSpec(n=4, edges=((0, 1), (0, 2), (1, 3), (2, 3)))
    gates = StaticGates(spec.edges)
    assert gates.weight.numel() == 2  # only the two edges into node 3
    assert {gates.edges[i] for i in gates.unit_edges} == {(0, 1), (0, 2)}


def test_output_is_unweighted_mean_of_sinks_and_isolated_node_is_both():
    spec = GraphSpec(n=3, edges=((0, 1),))  # node 2 isolated: a source and a sink
    stage = probe_stage(spec)
    assert stage.sources == [0, 2] and stage.sinks == [1, 2]
    out = stage(torch.zeros(1, 2, 1, 1))
    assert torch.allclose(out, torch.full((1, 2, 1, 1), ((1 + 10) + 100) / 2))


def test_edge_drop_zeroes_exactly_one_multi_input_edge_and_keeps_others_aligned():
    spec = GraphSpec(n=4, edges=((0, 1), (0, 3), (1, 3), (2, 3), (1, 2), (0, 2)))
    stage = probe_stage(spec, edge_drop=0.999)
    stage.train()
    clean = torch.sigmoid(stage.gates.weight.detach())
    expected = dict(zip([stage.gates.edges[i] for i in stage.gates.weighted_index.tolist()], clean))
    torch.manual_seed(0)
    dropped = set()
    for _ in range(40):
        g = dict(zip(stage.gates.edges, stage.gates().detach().tolist()))
        zeros = [e for e, val in g.items() if val == 0.0]
        assert len(zeros) == 1
        dropped.add(zeros[0])
        for e, val in g.items():
            if e != zeros[0]:
                assert val == pytest.approx(float(expected.get(e, 1.0)))
    # Only edges into nodes with in-degree > 1 can be dropped; (0, 1) never is.
    assert (0, 1) not in dropped and dropped <= set(expected)
    # The node's input uses the remaining weights unchanged.
    torch.manual_seed(1)
    stage(torch.zeros(1, 2, 1, 1))
    stage.eval()
    assert (stage.gates() > 0).all()  # no drop at inference


def test_edge_drop_keeps_autograd_graph_static():
    spec = GraphSpec.generate("ws", 8, 0, k=4, p=0.5)
    stage = GraphStage(spec, 3, 4, gates=StaticGates(spec.edges, edge_drop=0.999))
    stage.train()
    for _ in range(3):
        stage.zero_grad(set_to_none=True)
        stage(torch.randn(2, 3, 8, 8)).sum().backward()
        assert all(p.grad is not None for p in stage.parameters())


def test_sources_downsample_and_change_channels():
    spec = GraphSpec.generate("ws", 8, 3, k=4, p=0.75)
    stage = GraphStage(spec, 3, 5, stride=2)
    for v in range(8):
        dw = stage.nodes[v][1]
        assert dw.stride == ((2, 2) if v in stage.sources else (1, 1))
        assert dw.in_channels == (3 if v in stage.sources else 5)
    assert stage(torch.randn(2, 3, 16, 16)).shape == (2, 5, 8, 8)


def test_outputs_released_after_last_consumer():
    spec = GraphSpec.generate("er", 12, 2, p=0.3)
    stage = GraphStage(spec, 2, 2)
    released = [u for lst in stage.release_after for u in lst]
    assert len(released) == len(set(released))
    assert set(released) == set(range(12)) - set(stage.sinks)
    for v, lst in enumerate(stage.release_after):
        for u in lst:
            assert max(w for a, w in spec.edges if a == u) == v


@pytest.mark.parametrize("name", ["randwire_small", "randwire_c109"])
def test_gradients_reach_every_parameter(name):
    model = build_model(name, channels=8, nodes=10, num_classes=5, stem="small", head_channels=16)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1]))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing


def test_every_stage_gets_its_own_graph_and_graphs_rebuild_the_model():
    kw = {"channels": 8, "nodes": 10, "num_classes": 3, "stem": "small", "head_channels": 16}
    model = build_model("randwire_c109", seed=4, **kw)
    graphs = get_graphs(model)
    assert list(graphs) == ["conv2", "conv3", "conv4", "conv5"]
    assert len({g.fingerprint() for g in graphs.values()}) == 4
    assert graphs["conv2"].n == 5 and graphs["conv3"].n == 10
    # Same graphs from an explicit edge list, even with another seed argument.
    rebuilt = build_model("randwire_c109", seed=99, graphs=graphs, **kw)
    assert {k: g.fingerprint() for k, g in get_graphs(rebuilt).items()} == {
        k: g.fingerprint() for k, g in graphs.items()
    }
    rebuilt.load_state_dict(model.state_dict())
    model.eval(), rebuilt.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), rebuilt(x))


def test_gates_may_list_edges_in_any_order_but_not_twice():
    spec = GraphSpec(n=3, edges=((0, 1), (0, 2), (1, 2)))
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    ordered = GraphStage(spec, 3, 4, gates=StaticGates([(0, 1), (0, 2), (1, 2)])).eval()
    torch.manual_seed(0)
    shuffled = GraphStage(spec, 3, 4, gates=StaticGates([(0, 2), (1, 2), (0, 1)])).eval()
    assert shuffled.last_use == {0: 2, 1: 2}
    with torch.no_grad():
        torch.testing.assert_close(shuffled(x), ordered(x))
    with pytest.raises(ValueError, match="repeat"):
        GraphStage(spec, 3, 4, gates=StaticGates([(0, 1), (0, 1)]))


def test_graphs_of_wrong_shape_are_rejected():
    kw = {"channels": 8, "nodes": 10, "stem": "small"}
    graphs = get_graphs(build_model("randwire_small", **kw))
    with pytest.raises(ValueError, match="do not fit"):
        build_model("randwire_small", channels=8, nodes=12, graphs=graphs)


def test_model_shapes_and_strides():
    model = build_model("randwire_c109", channels=8, nodes=10, head_channels=16, num_classes=7)
    feats = stage_outputs(model, torch.randn(1, 3, 64, 64))
    for name, f in feats.items():
        assert f.shape[1] == model.stage_channels[name]
        assert 64 // f.shape[-1] == model.stage_strides[name]
    assert [model.stage_strides[k] for k in feats] == [2, 4, 8, 16, 32]
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    small = build_model("randwire_small", channels=8, nodes=8, in_channels=1, stem="small")
    assert small(torch.randn(1, 1, 28, 28)).shape == (1, 1000)


def test_regular_regime_has_dropout_small_has_none():
    assert isinstance(build_model("randwire_c109", channels=8, nodes=10).dropout, nn.Dropout)
    assert isinstance(build_model("randwire_small", channels=8, nodes=8).dropout, nn.Identity)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"regime": "tiny"}, "regime='tiny'"),
        ({"gen": "xx"}, "gen='xx'"),
        ({"wiring": "nope"}, "wiring='nope'"),
        ({"node_op": "conv7"}, "node_op='conv7'"),
        ({"stem": "cifar"}, "stem='cifar'"),
        ({"gen_params": {"k": 5}}, "k=5"),
        ({"channels": 0}, "channels=0"),
    ],
)
def test_bad_model_arguments(kwargs, needle):
    with pytest.raises(ValueError) as err:
        build_model("randwire_small", **{"channels": 8, "nodes": 8, **kwargs})
    assert needle in str(err.value)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="randwire_small"):
        build_model("randwire_huge")


# ------------------------------------------------- node operations (RandWire Figure 6 ablation)
NODE_OP_POOLS = {"maxpool": nn.MaxPool2d, "avgpool": nn.AvgPool2d}
POOLS = tuple(NODE_OP_POOLS.values())


@pytest.mark.parametrize("op", ["sepconv", "conv", "maxpool", "avgpool"])
def test_every_node_op_replaces_the_transformation_of_all_nodes_and_trains(op):
    model = build_model(
        "randwire_small", node_op=op, channels=8, nodes=6, num_classes=5, head_channels=16
    )
    stages = [m for m in model.modules() if isinstance(m, GraphStage)]
    ops = [node for stage in stages for node in stage.nodes]
    assert len(stages) == 3 and len(ops) == 18
    assert {type(node) for node in ops} == {type(build_node_op(op, 8, 8, 1))}
    pools = [m for node in ops for m in node.modules() if isinstance(m, POOLS)]
    assert {type(p) for p in pools} == ({NODE_OP_POOLS[op]} if op in NODE_OP_POOLS else set())
    assert len(pools) == (len(ops) if op in NODE_OP_POOLS else 0)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("op", ["maxpool", "avgpool"])
def test_pooling_node_op_is_relu_3x3_pool_1x1_conv_bn(op, stride):
    """RandWire §4.1: "3x3 max-/average-pooling followed by a 1x1 convolution" in place of the
    conv of the ReLU-conv-BN triplet. A downsampling node pools with the stride (as the 3x3
    depthwise conv of sepconv strides); the 1x1 conv changes the channels. The paper does not
    say how a pool treats the zero padding, so only outputs away from the border are compared."""
    torch.manual_seed(0)
    node = build_node_op(op, 4, 6, stride).eval()
    (conv,) = [m for m in node.modules() if isinstance(m, nn.Conv2d)]
    (bn,) = [m for m in node.modules() if isinstance(m, nn.BatchNorm2d)]
    assert conv.kernel_size == (1, 1) and conv.bias is None
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2), bn.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 8, 8)
    pool = {"maxpool": F.max_pool2d, "avgpool": F.avg_pool2d}[op]
    y = F.conv2d(pool(torch.relu(x), 3, stride, 1), conv.weight)
    y = F.batch_norm(y, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    got = node(x)
    assert got.shape == (2, 6, 8 // stride, 8 // stride)
    inner = slice(1, -1 if stride == 1 else None)  # windows that cover no padding
    torch.testing.assert_close(got[..., inner, inner], y[..., inner, inner])


def test_width_matching_follows_the_models_own_graphs():
    # Matching used to count FLOPs on WS(4, 0.75) seed-1 graphs whatever the model's generator:
    # an 8-node ER model with a conv node op then failed ("k=4 is out of range").
    kw = {"nodes": 8, "gen": "er", "gen_params": {"p": 0.3}, "seed": 2, "node_op": "conv"}
    model = build_model("randwire_small", **kw)
    from rwdet.complexity import matched_width
    from rwdet.models.randwire import RandWire

    graph_kwargs = {k: kw[k] for k in ("gen", "gen_params", "seed")}
    width = matched_width(
        lambda c: RandWire(regime="small", channels=c, nodes=8, node_op="conv", **graph_kwargs),
        lambda: RandWire(regime="small", channels=78, nodes=8, **graph_kwargs),
        78,
    )
    assert model.stage_channels["conv2"] == width
