"""Command-line flags that pick a model and its wiring, shared by every tool in ``tools/``."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser, default_model: str = "randwire_small") -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default_model, help="registered model name")
    g.add_argument("--gen", choices=["er", "ba", "ws"], default=None, help="graph generator")
    g.add_argument("--k", type=int, default=None, help="WS: neighbours (even)")
    g.add_argument("--p", type=float, default=None, help="WS rewiring / ER edge probability")
    g.add_argument("--m", type=int, default=None, help="BA: edges per new node")
    g.add_argument("--seed", type=int, default=None, help="network seed (stage graphs)")
    g.add_argument("--wiring", default=None, help="static (RandWire), dnw or popup")
    g.add_argument("--nodes", type=int, default=None, help="N, nodes per random stage")
    g.add_argument("--channels", type=int, default=None, help="C, the width")
    g.add_argument("--node-op", default=None, help="sepconv, conv, maxpool or avgpool")


def model_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Only the flags the user set, so each model keeps its own defaults for the rest."""
    kwargs = {}
    gen_params = {k: getattr(args, k) for k in ("k", "p", "m") if getattr(args, k) is not None}
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
