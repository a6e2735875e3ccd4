"""Aggregating a study's runs: mean ± std over seeds, a markdown table and the edge-popup
paper's figures (Ramanujan et al. 2020, Figures 3-7).

A run record is a dict: ``group``, ``label``, ``baseline`` (a learned-dense reference),
``axes`` (``model``, ``k``, ``width``, ``init``, ``seed``, ...) and ``top1`` (the last epoch's
accuracy: "we train for 100 epochs and report the last epoch accuracy", §4.1), or ``top1``
None for a run that has not finished (left out of the statistics, counted in the table).

The std is the sample standard deviation over seeds (ddof=1; 0 for a single seed, which the
table marks with its ``n``): the paper plots "mean accuracy ± one standard deviation" of 5 seeds
(§4.1) without saying which estimator; with 5 seeds the two differ by 12%.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

from rwdet.atomic import atomic_write

AXIS_LABELS = {
    "model": "model",
    "wiring": "wiring",
    "width": "width",
    "k": "% weights",
    "fixed_k": "|E| (% at width 1)",
    "init": "init",
    "scale": "scaled",
    "lr": "lr",
    "group": "method",
}
AXIS_ORDER = ("model", "wiring", "width", "k", "fixed_k", "init", "scale", "lr")
# How the paper names the weight distributions (§4.1, §4.5): N_k, U_k, N_x, U_x.
INIT_NAMES = {
    "kaiming_normal": "Kaiming Normal (N_k)",
    "signed_constant": "Signed Kaiming Constant (U_k)",
    "xavier_normal": "Xavier Normal (N_x)",
    "signed_xavier_constant": "Signed Xavier Constant (U_x)",
    "kaiming_uniform": "Kaiming Uniform",
}


def mean_std(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _key_axes(axes: dict) -> tuple:
    return tuple((a, axes[a]) for a in AXIS_ORDER if a in axes)


def aggregate(records: list[dict]) -> list[dict]:
    """One row per group and setting (every axis but the seed), in first-seen order."""
    rows: dict = {}
    for r in records:
        key = (r["group"], _key_axes(r["axes"]))
        row = rows.setdefault(
            key,
            {"group": r["group"], "label": r.get("label", r["group"]),
             "baseline": bool(r.get("baseline")), "axes": dict(key[1]), "seeds": [],
             "top1": [], "missing": 0},
        )  # fmt: skip
        if r.get("top1") is None:
            row["missing"] += 1
        else:
            row["seeds"].append(r["axes"].get("seed"))
            row["top1"].append(float(r["top1"]))
    out = []
    for row in rows.values():
        row["n"] = len(row["top1"])
        row["mean"], row["std"] = mean_std(row["top1"]) if row["n"] else (None, None)
        out.append(row)
    return out


def _fmt_axis(axis: str, value) -> str:
    if value is None:
        return ""
    if axis in ("k", "fixed_k"):
        return f"{100 * float(value):g}"
    if axis == "scale":
        return "yes" if value else "no"
    return f"{value:g}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict]) -> str:
    """Mean ± std top-1 per setting, with every run's own accuracy, baselines first."""
    axes = [a for a in AXIS_ORDER if any(a in r["axes"] for r in rows)]
    head = ["method", *(AXIS_LABELS[a] for a in axes), "n", "top-1 (%) mean ± std", "per seed"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: not r["baseline"]):
        cells = [r["label"], *(_fmt_axis(a, r["axes"].get(a)) for a in axes), str(r["n"])]
        if r["n"] > 1:
            cells.append(f"{r['mean']:.2f} ± {r['std']:.2f}")
        elif r["n"]:
            cells.append(f"{r['mean']:.2f} (one seed)")
        else:
            cells.append("not run")
        per = ", ".join(f"{s}: {v:.2f}" for s, v in zip(r["seeds"], r["top1"]))
        if r["missing"]:
            per += f"{'; ' if per else ''}{r['missing']} unfinished"
        lines.append("| " + " | ".join([*cells, per]) + " |")
    return "\n".join(lines) + "\n"


def _series_name(axis, row: dict) -> str:
    """The legend entry of a row; ``axis`` may be a list of axes (joined with ", ")."""
    if isinstance(axis, list):
        return ", ".join(filter(None, (_series_name(a, row) for a in axis)))
    if axis == "group":
        return row["label"]
    value = row["axes"].get(axis)
    if value is None:  # an axis this row's group does not have (a dense baseline's init)
        return ""
    if axis == "init":
        name = INIT_NAMES.get(value, str(value))
        return f"Scaled {name}" if row["axes"].get("scale") else name
    if axis == "fixed_k":
        return f"|E| = weights at k={100 * value:g}%, width 1"
    return f"{AXIS_LABELS[axis]} {_fmt_axis(axis, value)}"


def _x_value(axis: str, row: dict):
    value = row["label"] if axis == "group" else row["axes"].get(axis)
    return 100 * value if axis in ("k", "fixed_k") and value is not None else value


def _panels(fig: dict, rows: list[dict]) -> list:
    axis = fig.get("panel")
    if not axis:
        return [None]
    return list(dict.fromkeys(r["axes"].get(axis) for r in rows))


def _in_panel(fig: dict, row: dict, panel) -> bool:
    return panel is None or row["axes"].get(fig["panel"]) == panel


def draw_figure(fig: dict, rows: list[dict], path: str, title: str = "") -> bool:
    """Draw one figure of a study to ``path`` (PNG); False when none of its runs finished."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["n"]]
    mains = [
        r for r in done
        if not r["baseline"] and (fig.get("groups") is None or r["group"] in fig["groups"])
    ]  # fmt: skip
    bases = [r for r in done if r["group"] in (fig.get("baselines") or [])]
    if not mains and not bases:
        return False
    panels = _panels(fig, mains or bases)
    f, axs = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axs[0], panels):
        if fig["kind"] == "bar":
            _bars(ax, fig, [r for r in mains + bases if _in_panel(fig, r, panel)])
        else:
            _lines(ax, fig, [r for r in mains if _in_panel(fig, r, panel)],
                   [r for r in bases if _in_panel(fig, r, panel)])  # fmt: skip
        if panel is not None:
            ax.set_title(f"{AXIS_LABELS[fig['panel']]} {_fmt_axis(fig['panel'], panel)}".strip())
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    f.suptitle(title or fig.get("title") or fig["name"], fontsize=10)
    f.tight_layout()

    def write(fh):
        f.savefig(fh, format="png", dpi=110)

    atomic_write(path, write)
    plt.close(f)
    return True


def _lines(ax, fig: dict, mains: list[dict], bases: list[dict]) -> None:
    xaxis, saxis = fig["x"], fig.get("series") or "group"
    series: dict = defaultdict(list)
    for r in mains:
        series[_series_name(saxis, r)].append(r)
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: _x_value(xaxis, r))
        x = [_x_value(xaxis, r) for r in rs]
        m = [r["mean"] for r in rs]
        s = [r["std"] for r in rs]
        (line,) = ax.plot(x, m, marker="o", label=name)
        ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                        color=line.get_color(), alpha=0.2)  # fmt: skip
    by_base: dict = defaultdict(list)
    for r in bases:
        by_base[r["label"]].append(r)
    styles = iter([("k", "--"), ("dimgray", "-."), ("darkred", ":"), ("navy", "--")] * 4)
    for name, rs in by_base.items():
        colour, dash = next(styles)
        xs = {_x_value(xaxis, r) for r in rs}
        if len(xs) > 1 and None not in xs:  # the baseline varies along x (width, Figure 4)
            rs = sorted(rs, key=lambda r: _x_value(xaxis, r))
            x = [_x_value(xaxis, r) for r in rs]
            m, s = [r["mean"] for r in rs], [r["std"] for r in rs]
            ax.plot(x, m, ls=dash, marker="s", color=colour, label=name)
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)],
                            color=colour, alpha=0.1)  # fmt: skip
        else:  # a horizontal line: it has 100% of the weights (Figure 3)
            mean, std = mean_std([v for r in rs for v in r["top1"]])
            ax.axhline(mean, ls=dash, label=name, color=colour)
            ax.axhspan(mean - std, mean + std, color=colour, alpha=0.1)
    ax.set_xlabel("% of weights" if xaxis == "k" else AXIS_LABELS.get(xaxis, xaxis))


def _bars(ax, fig: dict, rows: list[dict]) -> None:
    xaxis, saxis = fig["x"], fig.get("series") or "group"
    xs = list(dict.fromkeys(_x_value(xaxis, r) for r in rows))
    names = list(dict.fromkeys(_series_name(saxis, r) for r in rows))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        pos, m, s = [], [], []
        for j, x in enumerate(xs):
            hit = [r for r in rows if _x_value(xaxis, r) == x and _series_name(saxis, r) == name]
            if hit:
                vals = [v for r in hit for v in r["top1"]]
                mean, std = mean_std(vals)
                pos.append(j + (i - (len(names) - 1) / 2) * width)
                m.append(mean)
                s.append(std)
        ax.bar(pos, m, width, yerr=s, capsize=2, label=name)
    ax.set_xticks(range(len(xs)), [_fmt_axis(xaxis, x) if xaxis != "group" else x for x in xs])
    ax.set_xlabel(AXIS_LABELS.get(xaxis, xaxis))
    low = min((min(r["top1"]) for r in rows if r["top1"]), default=0)
    ax.set_ylim(max(0, low - 10), None)


def write_outputs(records: list[dict], figures: list[dict], out_dir: str, meta: dict) -> dict:
    """results.json, results.md and one PNG per figure with data; returns what was written."""
    import json

    rows = aggregate(records)
    table = markdown_table(rows)
    payload = {**meta, "runs": records, "summary": [
        {k: r[k] for k in ("group", "label", "baseline", "axes", "n", "mean", "std", "seeds",
                            "top1", "missing")} for r in rows]}  # fmt: skip
    atomic_write(
        os.path.join(out_dir, "results.json"),
        lambda f: f.write(json.dumps(payload, indent=1, default=str) + "\n"),
        mode="w",
    )
    head = f"# {meta.get('name', 'study')}"
    if meta.get("preset"):
        head += f" (preset {meta['preset']})"
    text = f"{head}\n\n{meta.get('reproduces', '')}\n\n{table}"
    atomic_write(os.path.join(out_dir, "results.md"), lambda f: f.write(text), mode="w")
    written = {"json": os.path.join(out_dir, "results.json"),
               "table": os.path.join(out_dir, "results.md"), "figures": []}  # fmt: skip
    for fig in figures:
        path = os.path.join(out_dir, f"{fig['name']}.png")
        title = f"{fig.get('title') or fig['name']}"
        if fig.get("paper"):
            title += f" (cf. paper {fig['paper']})"
        if draw_figure(fig, rows, path, title):
            written["figures"].append(path)
    written["rows"] = rows
    written["markdown"] = table
    return written
