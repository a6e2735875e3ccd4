"""Complexity over seeds 1-5 next to the papers' numbers (RandWire Tables 2-4)."""

from __future__ import annotations

import statistics

from rwdet.analysis.paper import RANDWIRE
from rwdet.complexity import complexity
from rwdet.models import build_model

PAPER_SEEDS = (1, 2, 3, 4, 5)  # "We use the same seeds 1, ..., 5 for all experiments."


def seed_table(model: str, input_size: int = 224, seeds=PAPER_SEEDS, **kwargs) -> dict:
    """Per-seed params/FLOPs of ``model`` and their mean and std (sample std, as the paper)."""
    rows = []
    for seed in seeds:
        c = complexity(build_model(model, seed=seed, **kwargs), input_size=input_size)
        rows.append({"seed": seed, "flops_m": c["flops"] / 1e6, "params_m": c["params"] / 1e6})
    summary = {"model": model, "input_size": input_size, "rows": rows}
    for key in ("flops_m", "params_m"):
        values = [r[key] for r in rows]
        summary[key] = statistics.mean(values)
        summary[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def randwire_tables(seeds=PAPER_SEEDS) -> list[dict]:
    out = []
    for key, (size, f, fs, p, ps, source) in RANDWIRE.items():
        t = seed_table(key.split("@")[0], input_size=size, seeds=seeds)
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
