"""Complexity over seeds 1-5 next to the papers' numbers (RandWire Tables 2-4)."""

from __future__ import annotations

import statistics

from rwdet.analysis.paper import RANDWIRE
from rwdet.complexity import complexity
from rwdet.complexity.meta import meta_build
from rwdet.models import build_model

PAPER_SEEDS = (1, 2, 3, 4, 5)  # "We use the same seeds 1, ..., 5 for all experiments."


def seed_table(model: str, input_size: int = 224, seeds=PAPER_SEEDS, **kwargs) -> dict:
    """Per-seed params/FLOPs of ``model`` and their mean and std (sample std, as the paper)."""
    return seed_tables(model, (input_size,), seeds, **kwargs)[0]


def seed_tables(model: str, sizes, seeds=PAPER_SEEDS, **kwargs) -> list[dict]:
    """``seed_table`` at each input size in ``sizes``, building each seed's network once.

    The networks are built on the ``meta`` device: a dense model's counts need shapes only, so
    no weight is drawn and no arithmetic runs (``rwdet.complexity.analytic``)."""
    rows: dict[int, list[dict]] = {size: [] for size in sizes}
    for seed in seeds:
        with meta_build():
            net = build_model(model, seed=seed, **kwargs)
        for size in sizes:
            c = complexity(net, input_size=size)
            rows[size].append(
                {"seed": seed, "flops_m": c["flops"] / 1e6, "params_m": c["params"] / 1e6}
            )
    out = []
    for size in sizes:
        summary = {"model": model, "input_size": size, "rows": rows[size]}
        for key in ("flops_m", "params_m"):
            values = [r[key] for r in rows[size]]
            summary[key] = statistics.mean(values)
            summary[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(summary)
    return out


def randwire_tables(seeds=PAPER_SEEDS) -> list[dict]:
    """RandWire Tables 2-4: every ``RANDWIRE`` row (``model@size``), in that order."""
    sizes: dict[str, list[int]] = {}
    for key, (size, *_) in RANDWIRE.items():
        sizes.setdefault(key.split("@")[0], []).append(size)
    tables = {}
    for model, model_sizes in sizes.items():
        for t in seed_tables(model, model_sizes, seeds):
            tables[model, t["input_size"]] = t
    out = []
    for key, (size, f, fs, p, ps, source) in RANDWIRE.items():
        t = dict(tables[key.split("@")[0], size])
        t["paper"] = {"flops_m": f, "flops_m_std": fs, "params_m": p, "params_m_std": ps}
        t["source"] = source
        out.append(t)
    return out


def to_markdown(tables: list[dict]) -> str:
    lines = [
        "| model | input | source | seed | FLOPs (M) | params (M) |",
        "|---|---|---|---|---|---|",
    ]
    for t in tables:
        for r in t["rows"]:
            lines.append(
                f"| {t['model']} | {t['input_size']} | | {r['seed']} | "
                f"{r['flops_m']:.1f} | {r['params_m']:.2f} |"
            )
        lines.append(
            f"| {t['model']} | {t['input_size']} | rwdet | mean±std | "
            f"**{t['flops_m']:.1f}±{t['flops_m_std']:.1f}** | "
            f"**{t['params_m']:.2f}±{t['params_m_std']:.2f}** |"
        )
        if "paper" in t:
            p = t["paper"]
            lines.append(
                f"| {t['model']} | {t['input_size']} | {t['source']} | mean±std | "
                f"{p['flops_m']:.0f}±{p['flops_m_std']:.0f} | "
                f"{p['params_m']:.1f}±{p['params_m_std']:.2f} |"
            )
    return "\n".join(lines)


def zoo_rows(names=None, input_size: int = 224) -> list[dict]:
    """Dense and kept params/FLOPs of registered models (sparse models at initialisation)."""
    import torch

    from rwdet.complexity import sparse_complexity
    from rwdet.models import list_models

    rows = []
    for name in names or list_models():
        torch.manual_seed(0)
        model = build_model(name)
        # CIFAR-sized models (conv2..conv8) have a head sized for their own input.
        c = sparse_complexity(model, input_size=getattr(model, "input_size", input_size))
        rows.append({"model": name, **{k: c[k] for k in ("params_dense", "params_kept")}})
        rows[-1].update({"flops_dense": c["flops_dense"], "flops_kept": c["flops"]})
    return rows


def dnw_table3() -> list[dict]:
    from rwdet.analysis.paper import DNW_TABLE3

    rows = zoo_rows(list(DNW_TABLE3))
    for r in rows:
        r["paper_params_m"], r["paper_flops_m"] = DNW_TABLE3[r["model"]]
    return rows


def zoo_markdown(rows: list[dict]) -> str:
    paper = "paper_params_m" in rows[0]
    head = "| model | params dense (M) | params kept (M) | FLOPs dense (M) | FLOPs kept (M) |"
    lines = [head + (" paper params (M) | paper FLOPs (M) |" if paper else "")]
    lines.append("|---" * (7 if paper else 5) + "|")
    for r in rows:
        line = (
            f"| {r['model']} | {r['params_dense'] / 1e6:.3f} | {r['params_kept'] / 1e6:.3f} | "
            f"{r['flops_dense'] / 1e6:.1f} | {r['flops_kept'] / 1e6:.1f} |"
        )
        if paper:
            line += f" {r['paper_params_m']} | {r['paper_flops_m']} |"
        lines.append(line)
    return "\n".join(lines)
