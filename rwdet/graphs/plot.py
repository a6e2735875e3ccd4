"""PNG plots of stage graphs in the style of RandWire Figure 4: sources blue, sinks red."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

from rwdet.graphs.spec import GraphSpec  # noqa: E402


def plot_stage(spec: GraphSpec, path: str, title: str | None = None) -> str:
    """Nodes on a circle in index order (clockwise, as WS places them), edges as arrows u -> v.

    Sources (read the stage input) are blue, sinks (averaged into the output) red; a node that
    is both (isolated) is blue with a red ring.
    """
    n = spec.n
    pos = [
        (math.sin(2 * math.pi * i / n), math.cos(2 * math.pi * i / n)) for i in range(n)
    ]  # clockwise from the top
    srcs, snks = set(spec.sources()), set(spec.sinks())
    fig, ax = plt.subplots(figsize=(5, 5))
    for u, v in spec.edges:
        ax.annotate(
            "",
            xy=pos[v],
            xytext=pos[u],
            arrowprops={
                "arrowstyle": "-|>",
                "color": "0.55",
                "lw": 0.6,
                "shrinkA": 5,
                "shrinkB": 5,
            },
        )
    for i, (x, y) in enumerate(pos):
        face = "tab:blue" if i in srcs else ("tab:red" if i in snks else "0.85")
        edge = "tab:red" if (i in srcs and i in snks) else "0.3"
        ax.scatter([x], [y], s=90, c=face, edgecolors=edge, linewidths=1.5, zorder=3)
        ax.text(1.12 * x, 1.12 * y, str(i), ha="center", va="center", fontsize=6)
    label = title or f"{spec.gen} {spec.params} seed={spec.seed}"
    ax.set_title(f"{label}\nN={n}, {len(spec.edges)} edges, {len(srcs)} sources, {len(snks)} sinks")
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
