#!/usr/bin/env python
"""Analysis tools for rwdet models.

python tools/analyze.py complexity randwire_c109 --gen ws --k 4 --p 0.75 --seed 1 [--json]
python tools/analyze.py complexity randwire_small --method traced  # fvcore's count instead
python tools/analyze.py complexity --table          # RandWire Tables 2-4, seeds 1-5, vs paper
python tools/analyze.py graph randwire_small --seed 1 --out output/graphs
python tools/analyze.py graph output/det/<run>/model_final.pth   # or best.pth, a converted .pkl
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rwdet.models.args import add_model_args, model_kwargs_from_args  # noqa: E402
from rwdet.run.errors import UserError, run_cli  # noqa: E402

PROG = "analyze.py"
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".pkl", ".ckpt")


def at_least_one(args, *flags):
    """Counts and sizes below 1 reach the model or loader as tracebacks; refuse them here."""
    for flag in flags:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None and value < 1:
            raise UserError(f"{flag} {value} is out of range; {flag} must be an integer >= 1")


def cmd_complexity(args):
    from rwdet.analysis.tables import (
        dnw_table3,
        randwire_tables,
        to_markdown,
        zoo_markdown,
        zoo_rows,
    )
    from rwdet.complexity import complexity
    from rwdet.models import build_model

    at_least_one(args, "--input-size")
    if args.table:
        tables = randwire_tables()
        dnw = dnw_table3()
        if args.json:
            print(json.dumps({"randwire": tables, "dnw_table3": dnw}, indent=1))
        else:
            print(
                to_markdown(tables) + "\n\nDNW Table 3 (at initialisation)\n\n" + zoo_markdown(dnw)
            )
        return
    if args.zoo:
        rows = zoo_rows(input_size=args.input_size)
        print(json.dumps(rows, indent=1) if args.json else zoo_markdown(rows))
        return
    args.model = args.model_name or args.model
    if args.model is None:
        raise UserError("complexity: name a model (e.g. randwire_small) or pass --table")
    kwargs = model_kwargs_from_args(args)
    model = build_model(args.model, **kwargs)
    if args.model.startswith("neuralgraph_"):  # DNW Table 1: kept edges x evaluations of f
        return _neural_graph_complexity(args, model, kwargs)
    c = complexity(model, input_size=args.input_size, method=args.method)
    c["model"], c["kwargs"] = args.model, kwargs
    if args.json:
        print(json.dumps(c))
    else:
        print(
            f"{args.model} {kwargs or ''}\n"
            f"  params:      {c['params'] / 1e6:.3f} M\n"
            f"  FLOPs:       {c['flops'] / 1e6:.1f} M multiply-adds at {args.input_size}px\n"
            f"  activations: {c['activations'] / 1e6:.2f} M"
        )


def _neural_graph_complexity(args, model, kwargs):
    """A dense count would count every candidate edge of the dense edge matrix; these models
    are counted by ``rwdet.complexity.sparse`` (kept edges, live nodes), with the continuous
    model's function evaluations measured on 16 seeded N(0, 1) images (not all-zero ones,
    whose trivial dynamics the solver crosses in a few steps)."""
    import torch

    from rwdet.complexity import sparse_complexity

    c = sparse_complexity(model, args.input_size)
    graph = model.graph
    if graph.time == "continuous":
        before = graph.sparse_counts()
        graph.reset_nfe()
        x = torch.randn(16, 3, args.input_size, args.input_size, generator=torch.manual_seed(0))
        with torch.no_grad():
            model.eval()(x)
        after = graph.sparse_counts()
        for key in ("flops", "flops_dense"):
            c[key] += after[key] - before[key]
        c["evaluations"] = after["evaluations"]
    c["model"], c["kwargs"] = args.model, kwargs
    if args.json:
        print(json.dumps(c))
        return
    print(
        f"{args.model} {kwargs or ''}\n"
        f"  params kept: {c['params_kept']:,} ({c['params_dense']:,} with every candidate edge)\n"
        f"  FLOPs kept:  {c['flops'] / 1e6:.2f} M multiply-adds at {args.input_size}px "
        f"({c['flops_dense'] / 1e6:.1f} M dense)\n"
        f"  evaluations of f per forward: {c['evaluations']:.1f} "
        f"({graph.time}{', mean NFE on 16 N(0,1) images' if graph.time == 'continuous' else ''})"
    )


def cmd_graph(args):
    from rwdet.analysis.graph_stats import graphs_from_checkpoint, stage_stats
    from rwdet.graphs.plot import plot_stage
    from rwdet.models import build_model, get_graphs

    name = args.model_name or args.model
    if name is None:
        raise UserError(
            "graph: name a model (e.g. randwire_small) or an rwdet checkpoint path (best.pth, "
            "a Detectron2 model_final.pth or a converted .pkl)"
        )
    # Anything that looks like a path is read as a checkpoint, so a missing or wrong file is
    # reported as a file, not as an unknown model name.
    if os.path.exists(name) or os.sep in name or name.endswith(CHECKPOINT_SUFFIXES):
        graphs = graphs_from_checkpoint(name)
        label = os.path.basename(name)
    else:
        args.model = name
        graphs = get_graphs(build_model(args.model, **model_kwargs_from_args(args)))
        label = args.model
    os.makedirs(args.out, exist_ok=True)
    stats = {}
    for name, spec in graphs.items():
        png = plot_stage(spec, os.path.join(args.out, f"{name}.png"), title=f"{label} {name}")
        stats[name] = {**stage_stats(spec), "png": png}
    if args.json:
        print(json.dumps(stats, indent=1))
        return
    cols = ["nodes", "edges", "sources", "sinks", "max_in_degree", "max_out_degree", "longest_path"]
    print(f"{'stage':<10}" + "".join(f"{c:>15}" for c in cols) + f"{'clustering':>12}  png")
    for name, s in stats.items():
        print(
            f"{name:<10}"
            + "".join(f"{s[c]:>15}" for c in cols)
            + f"{s['clustering']:>12.3f}  {s['png']}"
        )


def cmd_damage(args):
    from classification.damage import run_damage

    at_least_one(args, "--max-images", "--limit")
    study = run_damage(
        args.weights, args.data, args.out, args.max_images, args.limit, tuple(args.kinds)
    )
    worst = sorted(study["results"], key=lambda r: r["delta"])[:5]
    print(f"baseline top-1 {study['baseline_top1']:.2f}% on {study['images']} images")
    for r in worst:
        what = f"node {r['node']}" if r["kind"] == "node" else f"edge {tuple(r['edge'])}"
        print(f"  {r['stage']:<8} {what:<14} delta {r['delta']:+.2f}")
    print(f"{len(study['results'])} removals -> {args.out}/damage.json, {args.out}/damage.png")


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("complexity", help="params, FLOPs and activations")
    p.add_argument("model_name", nargs="?", help="registered model name (or --model)")
    add_model_args(p, default_model=None)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--table", action="store_true", help="RandWire Tables 2-4 (seeds 1-5), DNW Table 3"
    )
    p.add_argument("--zoo", action="store_true", help="every registered model: dense/kept size")
    p.add_argument(
        "--method",
        choices=("analytic", "traced"),
        default="analytic",
        help="one model's count: from op shapes (default) or fvcore's JIT trace (the reference)",
    )
    p.set_defaults(func=cmd_complexity)
    p = sub.add_parser("graph", help="PNG plots of every stage graph (Figure 4 style)")
    p.add_argument(
        "model_name",
        nargs="?",
        help="registered model name (or --model), or a checkpoint path: classification "
        "best.pth, Detectron2 model_final.pth or converted .pkl",
    )
    add_model_args(p, default_model=None)
    p.add_argument("--out", default="output/graphs", help="folder for the PNGs")
    p.add_argument("--json", action="store_true", help="statistics as JSON")
    p.set_defaults(func=cmd_graph)
    p = sub.add_parser("damage", help="graph damage study (RandWire §4.1, Figure 5)")
    p.add_argument("--weights", required=True, help="rwdet classification checkpoint")
    p.add_argument("--data", default=None, help="ImageNet-layout root (default: the run's data)")
    p.add_argument("--out", default="output/damage", help="folder for damage.json / .png")
    p.add_argument("--max-images", type=int, default=None, help="evaluate on the first N only")
    p.add_argument("--limit", type=int, default=None, help="removals per stage (default all)")
    p.add_argument("--kinds", nargs="+", default=["node", "edge"], choices=["node", "edge"])
    p.set_defaults(func=cmd_damage)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, PROG))
