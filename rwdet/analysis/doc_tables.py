"""The deterministic numbers the README and docs quote, as markdown (tools/docs_numbers.py).

Each ``block_*`` function returns the text between a doc's ``<!-- docs_numbers:NAME -->``
markers, computed from the code alone: graphs are seeded, sparse models are counted at
initialisation under torch seed 0, so the text is the same on every machine and a doc table
that no longer matches it is stale (``tests/test_docs_numbers.py``). Model counts are memoised,
so the blocks that share a model pay for it once.
"""

from __future__ import annotations

import json

_SPARSE: dict[tuple, dict] = {}
_SEEDS: dict[tuple, dict] = {}


def sparse(name: str, **kwargs) -> dict:
    """``sparse_complexity`` at 224 px (a model's own ``input_size`` if it has one) with torch
    seed 0 (DNW/popup initialisation), memoised."""
    key = (name, json.dumps(kwargs, sort_keys=True))
    if key not in _SPARSE:
        import torch

        from rwdet.complexity import sparse_complexity
        from rwdet.models import build_model

        torch.manual_seed(0)
        model = build_model(name, **kwargs)
        # CIFAR-sized models (conv2..conv8) have a head sized for their own input.
        size = getattr(model, "input_size", 224)
        _SPARSE[key] = sparse_complexity(model, input_size=size)
    return _SPARSE[key]


def seed_table(model: str, input_size: int = 224) -> dict:
    """``rwdet.analysis.tables.seed_table`` over the paper's seeds 1-5, memoised."""
    key = (model, input_size)
    if key not in _SEEDS:
        from rwdet.analysis.tables import seed_table as table

        _SEEDS[key] = table(model, input_size=input_size)
    return _SEEDS[key]


def randwire_tables() -> list[dict]:
    """What ``rwdet.analysis.tables.randwire_tables`` returns, from the memoised seed tables."""
    from rwdet.analysis.paper import RANDWIRE

    out = []
    for key, (size, f, fs, p, ps, source) in RANDWIRE.items():
        t = dict(seed_table(key.split("@")[0], size))
        t["paper"] = {"flops_m": f, "flops_m_std": fs, "params_m": p, "params_m_std": ps}
        t["source"] = source
        out.append(t)
    return out


def block_complexity() -> str:
    from rwdet.analysis.tables import to_markdown

    return to_markdown(randwire_tables())


def block_complexity_gap() -> str:
    gaps, inside = [], True
    for t in randwire_tables():
        p = t["paper"]
        for key, what in (("flops_m", "FLOPs"), ("params_m", "params")):
            gaps.append((abs(t[key] / p[key] - 1), t[key] / p[key] - 1, t, what))
            inside &= all(abs(r[key] - p[key]) <= 3 * p[key + "_std"] for r in t["rows"])
    worst = max(gaps, key=lambda g: g[0])
    name = worst[2]["model"].replace("randwire_", "").replace("c", "C=")
    size = f" at {worst[2]['input_size']} px" if worst[2]["input_size"] != 224 else ""
    return (
        f"Result: every model's mean is within {100 * worst[0]:.1f}% of the paper's mean "
        f"(largest gap: {name} {worst[3]}{size}, {100 * worst[1]:+.1f}%), and every seed lies "
        f"{'within' if inside else 'NOT within'} the paper's mean ± 3 std."
    )


def block_zoo() -> str:
    from rwdet.analysis.tables import zoo_markdown
    from rwdet.models import list_models

    return zoo_markdown([zoo_row(name) for name in list_models()])


def zoo_row(name: str, **kwargs) -> dict:
    c = sparse(name, **kwargs)
    return {
        "model": name,
        "params_dense": c["params_dense"],
        "params_kept": c["params_kept"],
        "flops_dense": c["flops_dense"],
        "flops_kept": c["flops"],
    }


DNW_LABELS = {
    "mobilenetv1_rg_x0225": "MobileNetV1-RG ×0.225",
    "mobilenetv1_dnw_x0225": "MobileNetV1-DNW ×0.225 (init)",
    "mobilenetv1_dnw_small_x0225": "MobileNetV1-DNW-Small ×0.225 (init)",
    "mobilenetv1_dnw_small_x015": "MobileNetV1-DNW-Small ×0.15 (init)",
    "mobilenetv1_dnw_x03": "MobileNetV1-DNW ×0.3 (init)",
    "mobilenetv1_rg_x049": "MobileNetV1-RG ×0.49",
    "mobilenetv1_dnw_x049": "MobileNetV1-DNW ×0.49 (init)",
}


def block_dnw_table3() -> str:
    from rwdet.analysis.paper import DNW_TABLE3

    lines = [
        "| model | ours: params kept | ours: FLOPs | paper: params | paper: FLOPs "
        "| ours vs paper |",
        "|---|---|---|---|---|---|",
    ]
    for name, (pp, pf) in DNW_TABLE3.items():
        c = sparse(name)
        f = c["flops"] / 1e6
        lines.append(
            f"| {DNW_LABELS[name]} | {c['params_kept'] / 1e6:.3f} M | {f:.1f} M | {pp} M | "
            f"{pf} M | {100 * (f / pf - 1):+.1f}% FLOPs |"
        )
    return "\n".join(lines)


SPARSE_ROWS = (
    ("randwire_small (static)", "randwire_small", {}),
    ("randwire_small, dnw", "randwire_small", {"wiring": "dnw"}),
    (
        "randwire_small, dnw, init=generator",
        "randwire_small",
        {"wiring": "dnw", "wiring_options": {"init": "generator"}},
    ),
    ("randwire_small, popup", "randwire_small", {"wiring": "popup"}),
    ("randwire_c109, dnw", "randwire_c109", {"wiring": "dnw"}),
    ("randwire_c109, popup", "randwire_c109", {"wiring": "popup"}),
    ("resnet50_dnw (keep=0.1)", "resnet50_dnw", {}),
    (
        "resnet50_dnw (keep=0.2, first layer dense)",
        "resnet50_dnw",
        {"keep": 0.2, "first_layer_dense": True},
    ),
    ("resnet50_popup (keep=0.3)", "resnet50_popup", {}),
    ("resnet101_popup", "resnet101_popup", {}),
    ("wide_resnet50_popup", "wide_resnet50_popup", {}),
)


def block_sparse_models(rows=SPARSE_ROWS) -> str:
    lines = [
        "| model | params dense | params kept | FLOPs dense | FLOPs kept | dead nodes |",
        "|---|---|---|---|---|---|",
    ]
    for label, name, kwargs in rows:
        c = sparse(name, **kwargs)
        dead = f"{c['dead_nodes']}/{c['nodes']}" if c.get("nodes") else ""
        lines.append(
            f"| {label} | {c['params_dense'] / 1e6:.3f} M | {c['params_kept'] / 1e6:.3f} M | "
            f"{c['flops_dense'] / 1e6:.1f} M | {c['flops'] / 1e6:.1f} M | {dead} |"
        )
    return "\n".join(lines)


GRAPH_GENS = (("ws", {"k": 4, "p": 0.75}), ("er", {"p": 0.2}), ("ba", {"m": 5}))


def block_graphs() -> str:
    """Stage statistics of randwire_small, seed 1, under the paper's three generators."""
    from rwdet.analysis.graph_stats import stage_stats
    from rwdet.models import build_model, get_graphs

    cols = ["nodes", "edges", "sources", "sinks", "max_in_degree", "max_out_degree"]
    lines = [
        "| generator | stage | "
        + " | ".join(c.replace("_", " ") for c in cols)
        + " | longest path | clustering |",
        "|---" * (len(cols) + 4) + "|",
    ]
    for gen, params in GRAPH_GENS:
        import torch

        with torch.device("meta"):
            model = build_model("randwire_small", gen=gen, gen_params=params, seed=1)
        label = f"{gen.upper()}({', '.join(str(v) for v in params.values())})"
        for stage, spec in get_graphs(model).items():
            s = stage_stats(spec)
            lines.append(
                f"| {label} | {stage} | "
                + " | ".join(str(s[c]) for c in cols)
                + f" | {s['longest_path']} | {s['clustering']:.3f} |"
            )
    return "\n".join(lines)


def block_node_op_widths() -> str:
    from rwdet.complexity.meta import meta_build
    from rwdet.models import build_model

    def width(name: str, op: str) -> int:  # the C the model itself chooses (seed 1)
        with meta_build():
            model = build_model(name, node_op=op, seed=1)
        return model.stage_channels["conv2"]

    small = {op: width("randwire_small", op) for op in ("conv", "maxpool", "avgpool")}
    reg = {op: width("randwire_c109", op) for op in ("conv", "maxpool", "avgpool")}
    pool = lambda d: (  # noqa: E731
        f"{d['maxpool']} for the pooling ops"
        if d["maxpool"] == d["avgpool"]
        else f"{d['maxpool']} for maxpool, {d['avgpool']} for avgpool"
    )
    return (
        f"(`rwdet.complexity.matched_width`, seed 1: C=78 becomes {small['conv']} for "
        f"`conv`, {pool(small)} in the small regime; C=109 becomes {reg['conv']} and "
        f"{pool(reg)}).\n"
    )


def block_mobilenet_graphs() -> str:
    """MobileNetV1-DNW x0.225's channel-level graphs: node blocks, strides and edge budgets."""
    from rwdet.models.mobilenet_dnw import MOBILENET_GRAPHS, mobilenet_budget

    lines = [
        "| graph | nodes (blocks) | stride of input nodes | budget at ×0.225 |",
        "|---|---|---|---|",
    ]
    size = 224 // 2  # after the stride-2 stem
    for name, c_in, c_out, layers, stride in MOBILENET_GRAPHS:
        size //= stride
        blocks = f"{c_in} + {layers}·{c_out}" if layers > 1 else f"{c_in} + {c_out}"
        budget = mobilenet_budget(c_in, c_out, layers, 0.225)
        lines.append(
            f"| {name} ({size}²) | {blocks} ({layers + 1} blocks) | {stride} | {budget:,} |"
        )
    return "\n".join(lines)


def block_dnw_floor() -> str:
    """The least FLOPs MobileNetV1-DNW x0.225 can have: every depthwise conv of a dead node off."""
    from rwdet.models.mobilenet_dnw import MOBILENET_GRAPHS, mobilenet_budget

    size, pointwise, edges = 224 // 2, 0, 0
    stem = 3 * 3 * 3 * MOBILENET_GRAPHS[0][1] * size * size
    for _name, c_in, c_out, layers, stride in MOBILENET_GRAPHS:
        size //= stride
        budget = mobilenet_budget(c_in, c_out, layers, 0.225)
        edges += budget
        pointwise += budget * size * size
    fc = MOBILENET_GRAPHS[-1][2] * 1000
    floor = (stem + pointwise + fc) / 1e6
    return (
        f"FLOPs floor at ×0.225: stem {stem / 1e6:.2f} M + pointwise edges {pointwise / 1e6:.2f} M "
        f"+ FC {fc / 1e6:.2f} M = {floor:.1f} M, so the paper's 42.1 M leaves ≈ "
        f"{42.1 - floor:.1f} M for live depthwise convs. The paper's DNW ×0.225 params (1.1 M) "
        f"are below the {(edges + fc) / 1e6:.2f} M that its own edge budget ({edges:,} edges) "
        "plus a dense 1024×1000 FC need;\n"
    )


def fmt_size(params_m: float, flops_m: float, kept: str = "") -> str:
    flops = f"{flops_m / 1000:.2f} G" if flops_m >= 1000 else f"{flops_m:.0f} M"
    return f"{params_m:.1f} M{kept} / {flops}"


def _rw(name: str) -> str:
    t = seed_table(name)
    return fmt_size(t["params_m"], t["flops_m"])


def _kept(name: str, suffix: str = "") -> str:
    c = sparse(name)
    return f"{c['params_kept'] / 1e6:.2f} M kept / {c['flops'] / 1e6:.1f} M{suffix}"


def _kept_params(name: str, suffix: str) -> str:
    return f"{sparse(name)['params_kept'] / 1e6:.1f} M kept {suffix}"


def _dense(name: str) -> str:
    c = sparse(name)
    return fmt_size(c["params_dense"] / 1e6, c["flops"] / 1e6)


# The README's model table: (model, paper, what it is, numbers from the code or None).
MODEL_ROWS = (
    (
        "randwire_small",
        "RandWire Table 2",
        "C=78, N=32, three random stages",
        lambda: _rw("randwire_small"),
    ),
    (
        "randwire_c109",
        "RandWire Tables 3, 5",
        "regular regime, C=109 (ResNet-50 class)",
        lambda: _rw("randwire_c109"),
    ),
    (
        "randwire_c154",
        "RandWire Tables 3-5",
        "regular regime, C=154 (ResNet-101 class)",
        lambda: _rw("randwire_c154"),
    ),
    (
        'randwire_*` + `wiring="dnw"',
        "ours (DNW on RandWire)",
        "top-k edges of the complete DAG, k = the generator's edge count",
        None,
    ),
    (
        'randwire_*` + `wiring="popup"',
        "ours (edge-popup on RandWire)",
        "fixed random weights and edges, scores choose",
        None,
    ),
    (
        "mobilenetv1_dnw_x{0225,03,049}`, `_small_*",
        "DNW Tables 3, 5",
        "MobileNetV1 as a channel-level learned graph",
        lambda: _kept("mobilenetv1_dnw_x0225", " (x0.225, at init)"),
    ),
    (
        "mobilenetv1_rg_x{0225,03,049}",
        "DNW Table 3",
        "the same graph with random fixed edges",
        lambda: _kept("mobilenetv1_rg_x0225", " (x0.225)"),
    ),
    (
        "resnet50_dnw",
        "DNW Table 4",
        "DNW sparse training of ResNet-50",
        lambda: _kept_params("resnet50_dnw", "at 10%"),
    ),
    (
        "resnet50_popup`, `resnet101_popup`, `wide_resnet50_popup",
        "edge-popup Fig. 8",
        "hidden subnetworks, k = 30% kept",
        lambda: _kept_params("resnet50_popup", "(ResNet-50)"),
    ),
    (
        "resnet50",
        "RandWire Tables 3, 5 baseline",
        "plain ResNet-50 (torchvision layout), same recipe",
        lambda: _dense("resnet50"),
    ),
)


def block_models(only=None) -> str:
    """The README's model table (``only``: the rows of those models, for a quick check)."""
    lines = ["| model | paper | what it is | params / FLOPs at 224² |", "|---|---|---|---|"]
    for model, paper, what, numbers in MODEL_ROWS:
        if only is None or model in only:
            lines.append(f"| `{model}` | {paper} | {what} | {numbers() if numbers else ''} |")
    return "\n".join(lines)


BLOCKS = {
    "models": block_models,
    "complexity": block_complexity,
    "complexity_gap": block_complexity_gap,
    "graphs": block_graphs,
    "zoo": block_zoo,
    "dnw_table3": block_dnw_table3,
    "sparse_models": block_sparse_models,
    "mobilenet_graphs": block_mobilenet_graphs,
    "dnw_floor": block_dnw_floor,
    "node_op_widths": block_node_op_widths,
}


def static_blocks(names=None) -> dict[str, str]:
    """{block name: markdown, ending in a newline} for the deterministic blocks."""
    out = {}
    for name in names or BLOCKS:
        text = BLOCKS[name]()
        out[name] = text if text.endswith("\n") else text + "\n"
    return out
