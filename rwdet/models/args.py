"""Command-line flags that pick a model and its wiring, shared by every tool in ``tools/``."""

from __future__ import annotations

import argparse

from rwdet.graphs import GENERATORS
from rwdet.nn.node_ops import NODE_OPS

# Live views of the registries, not copies: a generator or node op registered after this module
# is imported (docs/extending.md) is a valid --gen / --node-op of every tool and a valid
# model.gen / model.node_op of a classification config (classification/config.py reads these).
GEN_CHOICES = GENERATORS.keys()
NODE_OP_CHOICES = NODE_OPS.keys()
# Generator parameters that have a flag; a new generator's new parameter adds its flag below and
# its name here (both tools pass these on as ``gen_params``).
GEN_PARAM_FLAGS = ("k", "p", "m")


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "randwire_small") -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", default=default_model, help="registered model name (rwdet.models.list_models())"
    )
    g.add_argument("--gen", choices=GEN_CHOICES, default=None, help="graph generator")
    g.add_argument("--k", type=int, default=None, help="WS: neighbours (even)")
    g.add_argument("--p", type=float, default=None, help="WS rewiring / ER edge probability")
    g.add_argument("--m", type=int, default=None, help="BA: edges per new node")
    g.add_argument("--seed", type=int, default=None, help="graph seed (fixes every stage graph)")
    g.add_argument("--wiring", default=None, help="static (RandWire), dnw or popup")
    g.add_argument("--nodes", type=int, default=None, help="N, nodes per random stage")
    g.add_argument("--channels", type=int, default=None, help="C, the width")
    g.add_argument(
        "--node-op", choices=NODE_OP_CHOICES, default=None, help="node transformation (Figure 6)"
    )


def model_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Only the flags the user set, so each model keeps its own defaults for the rest."""
    kwargs = {}
    gen_params = {k: getattr(args, k) for k in GEN_PARAM_FLAGS if getattr(args, k) is not None}
    if args.gen is not None:
        kwargs["gen"] = args.gen
    if gen_params:
        kwargs["gen_params"] = gen_params
    for flag, key in (("seed", "seed"), ("wiring", "wiring"), ("nodes", "nodes")):
        if getattr(args, flag) is not None:
            kwargs[key] = getattr(args, flag)
    if args.channels is not None:
        kwargs["channels"] = args.channels
    if args.node_op is not None:
        kwargs["node_op"] = args.node_op
    return kwargs
