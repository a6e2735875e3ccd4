"""A generator or node op registered as docs/extending.md says reaches every tool and config.

The tools' ``--gen`` / ``--node-op`` choices and the classification config's ``model.gen`` /
``model.node_op`` rules are live views of ``GENERATORS`` and ``NODE_OPS``
(``rwdet/models/args.py``): a hard-coded list would refuse the new name in one place and accept
it in another.
"""

import contextlib
import importlib.util
import io
import json
import os

import pytest
import torch
from torch import nn

from classification import builders
from classification import config as C
from rwdet.complexity import complexity
from rwdet.graphs import GENERATORS
from rwdet.models import build_model, get_graphs
from rwdet.nn.node_ops import NODE_OPS
from rwdet.run.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GEN, OP = "test_chain", "test_pointwise"
SMALL = ["--nodes", "6", "--channels", "8"]


def chain(n, rng):
    """Node i feeds node i + 1: one source, one sink, nothing random."""
    del rng
    return [(v, v + 1) for v in range(n - 1)]


class PointwiseOp(nn.Sequential):
    def __init__(self, cin, cout, stride, conv_layer, norm_layer):
        super().__init__(
            nn.ReLU(), conv_layer(cin, cout, 1, stride=stride, bias=False), norm_layer(cout)
        )


@pytest.fixture
def registered(monkeypatch):
    """The throwaway generator and node op, removed again when the test ends."""
    monkeypatch.setitem(GENERATORS, GEN, (chain, {}))
    monkeypatch.setitem(NODE_OPS, OP, PointwiseOp)
    return monkeypatch


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def analyze(*argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        load_tool("analyze").main(list(argv))
    return out.getvalue()


def test_train_cls_offers_and_builds_a_registered_generator_and_node_op(registered):
    tool = load_tool("train_cls")
    help_text = tool.build_parser().format_help()
    assert GEN in help_text and OP in help_text
    args = tool.parse_args(["--gen", GEN, "--node-op", OP, *SMALL])
    cfg = C.resolve(args.config, tool.flags_from_args(args), args.opts)
    assert (cfg["model"]["gen"], cfg["model"]["node_op"]) == (GEN, OP)
    # The model the trainer builds from that config really uses both.
    model = builders.build(builders.model_spec(cfg, num_classes=10, in_channels=1))
    assert all(g.edges == tuple(chain(g.n, None)) for g in get_graphs(model).values())
    ops = [m for m in model.modules() if isinstance(m, PointwiseOp)]
    assert len(ops) == 3 * 6  # every node of the three random stages
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_config_overrides_validate_against_the_registries(registered):
    cfg = C.resolve(None, {}, ["model.gen", GEN, "model.node_op", OP])
    assert (cfg["model"]["gen"], cfg["model"]["node_op"]) == (GEN, OP)
    registered.undo()  # unregistered again: the same config is one clear error naming the choices
    with pytest.raises(UserError, match=f"model.gen='{GEN}'.*one of 'er', 'ba', 'ws'"):
        C.resolve(None, {}, ["model.gen", GEN])
    with pytest.raises(UserError, match=f"model.node_op='{OP}'.*'maxpool', 'avgpool'"):
        C.resolve(None, {}, ["model.node_op", OP])


def test_analyze_accepts_a_registered_generator_and_node_op(registered):
    out = analyze(
        "complexity", "randwire_small", "--gen", GEN, "--node-op", OP, *SMALL,
        "--input-size", "32", "--json",
    )  # fmt: skip
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kwargs"] == {"gen": GEN, "node_op": OP, "nodes": 6, "channels": 8}
    direct = complexity(build_model("randwire_small", **result["kwargs"]), input_size=32)
    assert (result["flops"], result["params"]) == (direct["flops"], direct["params"])


def test_unregistered_names_are_refused_by_both_tools(registered, capsys):
    registered.undo()
    with pytest.raises(UserError, match=f"invalid choice: '{GEN}'"):
        load_tool("train_cls").parse_args(["--gen", GEN])
    with pytest.raises(SystemExit) as e:
        analyze("complexity", "randwire_small", "--node-op", OP)
    assert e.value.code == 2 and f"invalid choice: '{OP}'" in capsys.readouterr().err


def test_detection_config_accepts_a_registered_generator(registered):
    spec = pytest.importorskip("rwdet.d2.spec")
    c = type("Cfg", (), {"GEN": GEN, "K": 0, "P": -1.0, "M": 0, "SEED": -1})()
    assert spec._gen_overrides(c) == {"gen": GEN}
