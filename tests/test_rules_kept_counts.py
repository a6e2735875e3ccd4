"""What the gate modules report keeping (``kept_counts``, rwdet.complexity.sparse's protocol).

These rules live in ``rwdet/nn/learned_gates.py`` and ``rwdet/nn/choose.py``, which ``make
mutate`` mutates, so they are stated here with the exact counts, in a fast test the mutation
run selects (``pyproject.toml``).
"""

from __future__ import annotations

import torch

from rwdet.complexity import KeptContext
from rwdet.graphs import GraphSpec
from rwdet.nn.choose import topk_mask
from rwdet.nn.learned_gates import DNWGates, FixedGates, PopupGates

SPEC = GraphSpec(5, ((0, 2), (1, 2), (0, 3), (2, 3), (1, 4), (3, 4)))


def _counts(params_dense: int, params_kept: int) -> dict:
    return dict(params_dense=params_dense, params_kept=params_kept, flops_dense=0, flops=0)


def test_learned_gates_keep_their_active_edges_into_live_nodes():
    """Dense: every candidate edge is a weight of the searched network. Kept: the chosen
    (active) edges whose target node is live; an edge into a dead node does no work."""
    torch.manual_seed(0)
    for gates in (DNWGates(SPEC, budget=4), PopupGates(SPEC, keep=0.5)):
        active = gates.active_edges()
        assert 0 < len(active) < len(gates.edges)
        assert gates.kept_counts(KeptContext()) == _counts(len(gates.edges), len(active))
        dead = active[0][1]  # the target of one chosen edge dies
        live = tuple(v != dead for v in range(SPEC.n))
        into_live = sum(1 for _, v in active if v != dead)
        assert into_live < len(active)
        got = gates.kept_counts(KeptContext(live_nodes=live))
        assert got == _counts(len(gates.edges), into_live)


def test_fixed_gates_count_their_non_zero_edges_dense_and_kept():
    values = torch.tensor([0.5, 0.0, -1.0, 0.0, 2.0, 1.0])
    gates = FixedGates(SPEC.edges, values)
    all_dead = KeptContext(live_nodes=(False,) * SPEC.n)  # an exported stage has no dead nodes
    assert gates.kept_counts(all_dead) == gates.kept_counts(KeptContext()) == _counts(4, 4)


def test_top_k_among_allowed_entries_runs_on_the_meta_device():
    """A shape-only forward (rwdet.complexity counts on meta tensors) chooses among allowed
    entries too: the mask has the values' shape and dtype, and nothing is counted."""
    values = torch.empty(4, 5, device="meta")
    allowed = torch.ones(4, 5, dtype=torch.bool, device="meta")
    mask = topk_mask(values, 3, allowed)
    assert mask.is_meta and mask.shape == (4, 5) and mask.dtype == values.dtype
