"""Graph damage (RandWire §4.1, Figure 5): remove one node or one edge of a trained network,
evaluate without retraining, and relate the accuracy loss to the node's output degree / the
edge target's input degree.

Removing a node takes out all of its output edges (its children lose that input) and, if it is
a sink, its share of the stage's output mean. Removing an edge takes out that one term of the
target's weighted sum; the target's other weights are unchanged.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable

import torch
from torch import nn

from rwdet.nn.gates import EdgeGates
from rwdet.nn.stage import GraphStage


def stages(model: nn.Module) -> dict[str, GraphStage]:
    return {name: m for name, m in model.named_modules() if isinstance(m, GraphStage)}


class DamagedGates(EdgeGates):
    """A stage's gates with some edges removed: a removed edge's gate is 0, so its term leaves
    the target's weighted sum and the target's other weights are unchanged. Removed edges are
    no longer unit edges (a unit edge bypasses its gate). The stage itself knows nothing of
    the damage: ``removed`` swaps these in and restores the original gates."""

    def __init__(self, gates: EdgeGates, removed_edges: set[int]):
        super().__init__(gates.edges)
        self.inner = gates
        self.unit_edges = frozenset(gates.unit_edges) - frozenset(removed_edges)
        keep = torch.ones(len(gates.edges))
        keep[sorted(removed_edges)] = 0.0
        self.register_buffer("keep", keep, persistent=False)

    def forward(self) -> torch.Tensor:
        gates = self.inner()
        return gates * self.keep.to(device=gates.device, dtype=gates.dtype)

    def active_edges(self) -> list[tuple[int, int]]:
        live = set(self.inner.active_edges())
        return [e for e, k in zip(self.edges, self.keep.tolist()) if k and e in live]


@contextlib.contextmanager
def removed(stage: GraphStage, node: int | None = None, edge: int | None = None):
    """Inside: ``stage`` runs with one node or one edge removed (module docstring). A removed
    node is its out-edges and, for a sink, its share of the stage's output mean."""
    edges = stage.gates.edges
    if node is not None:
        gone = {i for i, (u, _) in enumerate(edges) if u == node}
        sinks = [s for s in stage.sinks if s != node]
    else:
        gone, sinks = {edge}, stage.sinks
    gates, old_sinks = stage.gates, stage.sinks
    stage.gates, stage.sinks = DamagedGates(gates, gone), sinks
    try:
        yield
    finally:
        stage.gates, stage.sinks = gates, old_sinks


def damage_study(
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    kinds=("node", "edge"),
    limit: int | None = None,
) -> dict:
    """Accuracy loss for every single-node and single-edge removal (``limit``: first few only).

    ``evaluate(model)`` returns top-1 accuracy in percent with the model in eval mode.
    """
    model.eval()
    base = evaluate(model)
    results = []
    for name, stage in stages(model).items():
        edges = stage.gates.edges
        indeg = {v: sum(1 for _, w in edges if w == v) for v in range(stage.spec.n)}
        outdeg = {v: sum(1 for u, _ in edges if u == v) for v in range(stage.spec.n)}
        todo = []
        if "node" in kinds:
            todo += [("node", v, {"out_degree": outdeg[v]}) for v in range(stage.spec.n)]
        if "edge" in kinds:
            todo += [("edge", i, {"target_in_degree": indeg[v]}) for i, (_, v) in enumerate(edges)]
        for kind, idx, degree in todo[:limit]:
            with removed(stage, **{kind: idx}):
                acc = evaluate(model)
            item = {"stage": name, "kind": kind, "delta": acc - base, "top1": acc, **degree}
            if kind == "node":
                item["node"] = idx
            else:
                item["edge"] = list(edges[idx])
            results.append(item)
    return {"baseline_top1": base, "results": results}


def plot_damage(study: dict, path: str) -> str:
    """Figure 5 style: accuracy change vs degree; boxes per degree, red circle = mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kind, key, label in (
        (axes[0], "node", "out_degree", "output degree of removed node"),
        (axes[1], "edge", "target_in_degree", "input degree of removed edge's target"),
    ):
        items = [r for r in study["results"] if r["kind"] == kind]
        degrees = sorted({r[key] for r in items})
        groups = [[r["delta"] for r in items if r[key] == d] for d in degrees]
        if groups:
            ax.boxplot(groups, positions=degrees, widths=0.6, showfliers=False)
            for d, g in zip(degrees, groups):
                ax.scatter([d] * len(g), g, s=8, c="tab:blue", alpha=0.6)
                ax.scatter([d], [sum(g) / len(g)], s=40, facecolors="none", edgecolors="tab:red")
        ax.set_xlabel(label)
        ax.set_ylabel("Δ top-1 (points)")
        ax.set_title(f"remove one {kind} (baseline {study['baseline_top1']:.1f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_json(study: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(study, f, indent=1)
