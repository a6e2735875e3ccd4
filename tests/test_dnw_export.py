"""Exporting a DNW model to its plain pruned form: same outputs, dead nodes gone, same counts."""

import torch
from torch import nn

from rwdet.complexity import sparse_complexity
from rwdet.graphs import GraphSpec
from rwdet.models import build_model
from rwdet.nn import GraphStage
from rwdet.nn.export import export_subnetwork, prune_stage, stage_live_nodes, subnetwork_graphs
from rwdet.nn.learned_gates import DNWGates, FixedGates
from rwdet.nn.sparse_layers import SPARSE_LAYERS


def train_a_little(model, x, steps=2, lr=2.0):
    """A few steps so weights, masks and BN running statistics are not at their init values."""
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def assert_same_model_outputs(model, exported, x, exact=True, extra_params=0):
    """``extra_params``: parameters the export adds on purpose (a bias for folded constants)."""
    with torch.no_grad():
        a, b = model(x), exported(x)
    if exact:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, SPARSE_LAYERS) for m in exported.modules())
    ca, cb = sparse_complexity(model, x.shape[-1]), sparse_complexity(exported, x.shape[-1])
    assert (ca["flops"], ca["params_kept"] + extra_params) == (cb["flops"], cb["params_kept"])
    return ca, cb


def test_randwire_dnw_export_removes_dead_nodes_and_keeps_outputs():
    torch.manual_seed(0)
    model = build_model(
        "randwire_small", channels=8, nodes=8, wiring="dnw", num_classes=10, stem="small", seed=3
    )
    x = torch.randn(4, 3, 32, 32)
    train_a_little(model, x)
    with torch.no_grad():  # a wiring in which node 6 of conv4 lost all its out-edges
        gates = model.conv4.gates
        for e, (u, _) in enumerate(gates.edges):
            if u == 6:
                gates.weight[e] = 0.0
    live = {n: stage_live_nodes(model.get_submodule(n)) for n in ("conv3", "conv4", "conv5")}
    exported = export_subnetwork(model)
    ca, cb = assert_same_model_outputs(model, exported, x)
    removed = 0
    for name, flags in live.items():
        stage = exported.get_submodule(name)
        assert isinstance(stage.gates, FixedGates)
        assert len(stage.nodes) <= sum(flags) + 1  # + node 0 when it only feeds a zero edge
        assert all(stage_live_nodes(stage)[v] or v == 0 for v in range(len(stage.nodes)))
        removed += len(flags) - len(stage.nodes)
    assert removed > 0 and ca["dead_nodes"] > 0 and cb["dead_nodes"] <= ca["dead_nodes"]
    assert "rwdet_spec" not in vars(exported) and exported.rwdet_exported_from["name"]
    learned = subnetwork_graphs(model)
    assert set(learned["conv4"].edges) == set(model.conv4.gates.active_edges())


def test_orphan_node_keeps_a_zero_edge_so_it_does_not_read_the_stage_input():
    torch.manual_seed(0)
    spec = GraphSpec(n=4, edges=((0, 1), (1, 3), (2, 3)))
    stage = GraphStage(spec, 3, 3, stride=1, node_op="conv", gates=DNWGates(spec)).eval()
    with torch.no_grad():  # real edges: 0->1, 1->3, 2->3; node 2 has no real parent
        stage.gates.weight.copy_(torch.tensor([0.9, 0.01, 0.02, 0.03, 0.8, -0.7]))
    assert stage.gates.active_edges() == [(0, 1), (1, 3), (2, 3)]
    pruned = prune_stage(stage)
    assert (0, 2) in pruned.gates.edges and (0, 2) not in pruned.gates.active_edges()
    assert pruned.sources == [0]
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(stage(x), pruned(x))


def test_mobilenet_dnw_export_cuts_dead_channels():
    torch.manual_seed(0)
    model = build_model("mobilenetv1_dnw_small_x0225", node_multiplier=0.25, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    train_a_little(model, x, lr=0.5)
    exported = export_subnetwork(model)
    # DNW-Small's FC has no bias (as the authors'); the export gives it one, into which the
    # constant outputs of dead channels fold.
    assert model.fc.bias is None and exported.fc.bias is not None
    ca, cb = assert_same_model_outputs(
        model, exported, x, exact=False, extra_params=model.fc.out_features
    )
    assert ca["dead_nodes"] > 0
    assert sum(sum(getattr(exported, n).blocks[:-1]) for n in exported.stage_names) < sum(
        sum(getattr(model, n).blocks[:-1]) for n in model.stage_names
    )
    assert all(getattr(exported, n).wiring == "fixed" for n in exported.stage_names)
    assert cb["flops_dense"] < ca["flops_dense"]


def test_resnet_dnw_export_zeroes_unkept_weights():
    torch.manual_seed(0)
    model = build_model("resnet50_dnw", keep=0.2, layers=[1, 1, 1, 1], num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    train_a_little(model, x, steps=1, lr=0.1)
    exported = export_subnetwork(model)
    assert_same_model_outputs(model, exported, x)
    conv = exported.layer1[0].conv2
    assert int((conv.weight != 0).sum()) == model.layer1[0].conv2.count


def test_mobilenet_output_nodes_without_in_edges_fold_into_the_fc_bias():
    torch.manual_seed(0)
    model = build_model("mobilenetv1_dnw_x0225", node_multiplier=0.25, num_classes=10)
    x = torch.randn(4, 3, 32, 32)
    train_a_little(model, x, lr=0.5)
    g = model.conv5
    rows = g.block_slices()[1][-1]
    with torch.no_grad():  # output nodes 0..9 of the last graph lose every in-edge
        g.weight[rows.start : rows.start + 10] = 0.0
        model.head[0].running_mean.uniform_(-1, 1)  # BN(0) -> ReLU is a non-zero constant
        model.head[0].bias.uniform_(0, 1)
    assert not model.sparse_liveness()["head.0"][:10].any()
    exported = export_subnetwork(model)
    assert exported.fc.in_features <= model.fc.in_features - 10
    assert_same_model_outputs(model, exported, x, exact=False)


def test_export_keeps_dtype_and_exports_a_bare_stage_or_layer():
    """A float64 popup/DNW stage passed in on its own exports to plain layers in float64."""
    from rwdet.nn.sparse_layers import PopupConv2d
    from rwdet.nn.wiring import get_wiring

    torch.manual_seed(0)
    spec = GraphSpec.generate("ws", 8, 1, k=4, p=0.75)
    x = torch.randn(2, 3, 8, 8, dtype=torch.double)
    for mode in ("dnw", "popup"):
        w = get_wiring(mode)
        stage = GraphStage(
            spec,
            3,
            4,
            gates=w.make_gates(spec, 0.0),
            conv_layer=w.conv_layer,
            norm_layer=w.norm_layer,
        ).double()
        stage.eval()
        exported = export_subnetwork(stage)
        assert isinstance(exported.gates, FixedGates), mode
        assert not any(isinstance(m, SPARSE_LAYERS) for m in exported.modules()), mode
        assert {p.dtype for p in exported.parameters()} <= {torch.double}, mode
        with torch.no_grad():
            torch.testing.assert_close(exported(x), stage(x))
    layer = PopupConv2d(3, 4, 3, padding=1, keep=0.5).double()
    plain = export_subnetwork(layer)
    assert type(plain) is nn.Conv2d and plain.weight.dtype == torch.double
    torch.testing.assert_close(plain(x), layer(x))
