"""DNW's tiny neural-graph classifiers of Table 1: static, discrete-time and continuous-time.

Wortsman et al. 2019, §2.1, §2.3, §3.1, Table 1 and footnotes 3-4; the sizes are the authors'
``apps/small_scale/*.yml`` (dim 800, downsample_dim 32, feature_dim 100, layers 5,
prune_rate 0.95). One channel is one node (§2.1):

- ``g_phi`` (footnote 3): two 3x3 stride-2 convolutions, the first standard (to
  ``downsample_dim / 2`` channels, BN, ReLU), the second depthwise-separable (3x3 depthwise,
  1x1 to ``downsample_dim``, BN), as in the authors' ``downsample()``. Each of its channels is
  the state of one input node.
- Node op ``f_v`` (§3.1): InstanceNorm (affine) -> ReLU -> 3x3 single-channel convolution,
  applied to the node's aggregated input ``I_v = sum_u w_uv Z_u`` (eq. 1); output nodes have
  none (§2.4) and no children. Nodes are numbered inputs first, outputs last.
- ``time="static"`` (eq. 1, §2.4): 5 blocks, ``B_0`` the input nodes, ``B_4`` the output nodes,
  the hidden nodes split as evenly as possible into ``B_1..B_3``; an edge only goes from a block
  to a later one (longest path 4).
- ``time="discrete"`` (eq. 12): ``Z(l+1) = f(A_G Z(l))`` for ``l = 0..L-1``, ``L = 5``, from
  ``Z(0) = (g_phi(X), 0, ..., 0)`` (eq. 10); one graph and one set of node ops shared over time
  (the authors' model), trained by backpropagation through time. Cycles and self-loops are
  allowed; input nodes may have parents (§2.3).
- ``time="continuous"`` (eq. 13): ``dZ/dt = f(A_G Z(t))`` integrated from t = 0 to 1 by
  ``torchdiffeq``'s adaptive 5th-order Runge-Kutta ``dopri5`` at ``rtol = atol = 1e-3``
  (footnote 4), backpropagating through the solver's operations (§3.1) or, with
  ``adjoint=True``, by the adjoint method (§2.3; less memory, more solver calls). The number
  of function evaluations of each forward is kept (``graph.nfe``, ``graph.nfe_mean``).
- ``h_psi``: average of the output nodes over the 2x2 window whose lower-right pixel is the
  centre pixel, then FC ``feature_dim -> classes``. The authors' released model pools "only the
  middle section" this way (at 32 px: rows/cols 2-3 of the 8x8 map); ``readout="avg"`` pools the
  whole map instead.

Edges. The complete graph has ``dim^2`` ordered pairs (the authors' 800x800 edge matrix) and
every setting keeps ``keep = 5%`` of them (the paper's k): ``kept_count(0.05, 800^2) =
32,000`` edges (the authors' ``prune_rate 0.95``), chosen among the pairs the setting allows
(static: block order; dynamic: any sender that has an op). ``wiring="dnw"`` re-chooses the
top-``keep`` ``|w|`` every step with ``rwdet.nn.choose.dnw_weight`` (gradient *to*
hallucinated edges, not through them, Algorithm 1). ``wiring="random"`` is the paper's RG
(§3): uniform random magnitudes from ``seed``, the same top-``keep`` choice once; the chosen
edges are the persistent buffer ``graph.mask`` in the state dict, so a checkpoint carries its
random graph.

Parameters (CIFAR-10, 3 channels, 10 classes; the same in all six rows): the paper says 41k,
the authors' code "less than 42k". Ours: 32,000 kept edges + 700 ops x (2 IN + 9 conv) = 7,700
+ g_phi 1,184 + FC 1,010 = **41,894** (``PAPER_PARAMS`` is checked against this in
``tests/test_neural_graph.py``). The dense tensors hold all candidate edges (the optimiser sees
them); ``rwdet.complexity.sparse`` counts the kept ones.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from torch import nn

from rwdet.models.interface import StagedClassifier, check_dropout, check_num_classes
from rwdet.models.registry import register_model
from rwdet.nn.choose import dnw_weight, kept_count, refuse_k, topk_mask
from rwdet.run.errors import UserError

TIMES = ("static", "discrete", "continuous")
WIRINGS = ("dnw", "random")
READOUTS = ("center", "avg")
PAPER_PARAMS = 41_000  # DNW §3.1: "The models have 41k parameters"


def static_blocks(dim: int, n_in: int, n_out: int, blocks: int) -> list[int]:
    """Node counts of the static graph's blocks: inputs, hidden split evenly, outputs."""
    hidden, parts = dim - n_in - n_out, blocks - 2
    if parts < 1 or hidden < parts:
        raise ValueError(
            f"blocks={blocks} needs >= 3 blocks and >= 1 hidden node per hidden block "
            f"({hidden} hidden nodes)"
        )
    return [n_in] + [hidden // parts + (i < hidden % parts) for i in range(parts)] + [n_out]


def allowed_edges(time: str, dim: int, n_out: int, blocks: list[int] | None) -> torch.Tensor:
    """Candidate edges as a ``(receiver, sender)`` boolean matrix over all ``dim`` nodes.

    Output nodes send nothing (they have no op and no children, §2.1/§2.4). Static: a sender's
    block must come before the receiver's. Dynamic: every other pair, self-loops included."""
    allowed = torch.zeros(dim, dim, dtype=torch.bool)
    if time != "static":
        allowed[:, : dim - n_out] = True
        return allowed
    start = 0
    for b in blocks:
        allowed[start + b :, start : start + b] = True
        start += b
    allowed[:, dim - n_out :] = False
    return allowed


class TimedNeuralGraph(nn.Module):
    """The graph of channel nodes, run as a static, discrete-time or continuous-time graph.

    ``forward(z0)`` takes the input nodes' states ``(B, n_in, H, W)`` and returns the output
    nodes' states ``(B, n_out, H, W)``. ``weight[v, u]`` is the edge ``u -> v``.
    """

    def __init__(
        self,
        time: str,
        wiring: str = "dnw",
        keep: float = 0.05,
        dim: int = 800,
        n_in: int = 32,
        n_out: int = 100,
        blocks: int = 5,
        steps: int = 5,
        seed: int | None = 1,
        adjoint: bool = False,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        method: str = "dopri5",
        k: float | None = None,
    ):
        refuse_k(k, "TimedNeuralGraph")
        super().__init__()
        if time not in TIMES:
            raise ValueError(f"time={time!r} is not known; use one of {TIMES}")
        if wiring not in WIRINGS:
            raise ValueError(
                f"wiring={wiring!r} is not known for a neural graph; use dnw or random"
            )
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps={steps!r} must be an integer >= 1 (time steps L)")
        if not (n_in >= 1 and n_out >= 1 and n_in + n_out < dim):
            raise ValueError(f"dim={dim} must exceed inputs {n_in} + outputs {n_out} (>= 1 each)")
        # Looked up, not imported: torchdiffeq makes its solver tables at import, which under a
        # ``torch.device("meta")`` context would leave them without data for the whole process.
        if time == "continuous" and importlib.util.find_spec("torchdiffeq") is None:
            raise UserError(
                "time='continuous' integrates with torchdiffeq, which is not installed; run "
                "`make setup` (it installs the pinned torchdiffeq)"
            )
        self.time, self.wiring, self.keep = time, wiring, keep
        self.dim, self.n_in, self.n_out, self.n_ops = dim, n_in, n_out, dim - n_out
        self.steps, self.adjoint = steps, bool(adjoint)
        self.rtol, self.atol, self.method = rtol, atol, method
        self.blocks = static_blocks(dim, n_in, n_out, blocks) if time == "static" else None
        allowed = allowed_edges(time, dim, n_out, self.blocks)
        self.count = kept_count(keep, dim * dim)
        if self.count > int(allowed.sum()):
            raise ValueError(
                f"keep={keep} keeps {self.count} edges but only {int(allowed.sum())} exist"
            )
        self.register_buffer("allowed", allowed, persistent=False)
        # Algorithm 1, line 2: uniform. The scale is the authors' (their edge matrix is an
        # nn.Conv2d(dim, dim, 1): U(-1/sqrt(dim), 1/sqrt(dim))). It matters: the InstanceNorm
        # hides it from the hidden nodes, but it sets how far an SGD step moves |w| against
        # the top-k threshold, i.e. how fast DNW rewires (docs/dnw_dynamic.md).
        bound = 1.0 / math.sqrt(dim)
        self.weight = nn.Parameter(torch.empty(dim, dim).uniform_(-bound, bound))
        if wiring == "random":
            # seed=None: torch's global generator, i.e. the run's training seed (a study's
            # seeds then average over random graphs too, as the authors' runs did); the mask
            # is a persistent buffer either way, so the file carries the graph.
            gen = None if seed is None else torch.Generator().manual_seed(int(seed))
            magnitude = torch.rand(dim, dim, generator=gen)
            self.register_buffer("mask", topk_mask(magnitude, self.count, allowed))
        self.norm = nn.InstanceNorm2d(self.n_ops, affine=True)
        self.conv = nn.Conv2d(self.n_ops, self.n_ops, 3, padding=1, groups=self.n_ops, bias=False)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_in", nonlinearity="relu")
        self.nfe = 0  # function evaluations of the last forward (static: 1, discrete: L)
        self.nfe_backward = 0  # adjoint solver calls in the last backward
        self.nfe_total = self.forwards = 0
        self.last_hw = None
        self.solving = False

    def effective_weight(self) -> torch.Tensor:
        if self.wiring == "dnw":
            return dnw_weight(self.weight, self.count, self.allowed)
        return self.weight * self.mask

    def kept_mask(self) -> torch.Tensor:
        if self.wiring == "dnw":
            return topk_mask(self.weight.abs(), self.count, self.allowed).bool()
        return self.mask.bool()

    @property
    def nfe_mean(self) -> float:
        """Mean function evaluations per forward since construction (or ``reset_nfe``)."""
        return self.nfe_total / self.forwards if self.forwards else float("nan")

    def reset_nfe(self) -> None:
        self.nfe_total = self.forwards = 0

    def node_op(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """``f_v`` of nodes ``lo..hi-1`` (all have ops): IN (affine) -> ReLU -> 3x3 conv."""
        x = F.instance_norm(
            x, weight=self.norm.weight[lo:hi], bias=self.norm.bias[lo:hi], eps=self.norm.eps
        )
        return F.conv2d(F.relu(x), self.conv.weight[lo:hi], padding=1, groups=hi - lo)

    def step(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``f(A_G Z)`` over all nodes: aggregate along the edges, then each node's op."""
        inputs = F.conv2d(z[:, : self.n_ops], w[:, : self.n_ops, None, None])
        ops = self.node_op(inputs[:, : self.n_ops], 0, self.n_ops)
        return torch.cat((ops, inputs[:, self.n_ops :]), 1)

    def forward(self, z0: torch.Tensor) -> torch.Tensor:
        if z0.shape[1] != self.n_in:
            raise ValueError(f"the graph has {self.n_in} input nodes, got {z0.shape[1]} channels")
        self.last_hw = int(z0.shape[-2] * z0.shape[-1])
        if self.time == "static":
            out = self._static(z0, self.effective_weight())
            self.nfe = 1
        else:
            rest = z0.new_zeros(z0.shape[0], self.dim - self.n_in, *z0.shape[2:])
            z = torch.cat((z0, rest), 1)  # eq. 10: non-input nodes start at zero
            z = self._discrete(z) if self.time == "discrete" else self._continuous(z)
            out = z[:, self.n_ops :]
        self.nfe_total += self.nfe
        self.forwards += 1
        return out

    def _static(self, z0: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        states, start = [z0], self.n_in
        for j, b in enumerate(self.blocks[1:], 1):
            src = torch.cat(states, 1) if len(states) > 1 else z0
            inputs = F.conv2d(src, w[start : start + b, :start, None, None])
            last = j == len(self.blocks) - 1
            states.append(inputs if last else self.node_op(inputs, start, start + b))
            start += b
        return states[-1]

    def _discrete(self, z: torch.Tensor) -> torch.Tensor:
        w = self.effective_weight()  # one graph for every time step
        for _ in range(self.steps):
            z = self.step(z, w)
        self.nfe = self.steps
        return z

    def _continuous(self, z: torch.Tensor) -> torch.Tensor:
        from torchdiffeq import odeint, odeint_adjoint

        self.nfe = 0
        self.nfe_backward = 0
        t = torch.tensor([0.0, 1.0], dtype=z.dtype, device=z.device)
        opts = dict(rtol=self.rtol, atol=self.atol, method=self.method)
        self.solving = True
        try:
            if self.adjoint and torch.is_grad_enabled():
                # The adjoint re-evaluates f (and so the chosen edges) from the parameters.
                func = _Dynamics(self, None)
                params = tuple(p for p in self.parameters() if p.requires_grad)
                return odeint_adjoint(func, z, t, adjoint_params=params, **opts)[1]
            return odeint(_Dynamics(self, self.effective_weight()), z, t, **opts)[1]
        finally:
            self.solving = False

    def sparse_counts(self) -> dict:
        """Params and multiply-adds of the last forward's map size, counting only kept edges
        into needed nodes and the ops of live nodes (``rwdet.complexity.sparse``).

        A node is live when a kept path leads from it to an output node (in the dynamic graphs
        a path of any length: an upper bound for L steps). Per evaluation of ``f``: one
        multiply-add per kept edge and 9 per live node op, per pixel; static runs each edge
        once, discrete ``L`` times, continuous the measured mean number of evaluations."""
        if self.last_hw is None:
            raise ValueError("run a forward first: the counts need the map size (and NFE)")
        mask = self.kept_mask()
        needed = torch.zeros(self.dim, dtype=torch.bool, device=mask.device)
        needed[self.n_ops :] = True
        while True:
            live = mask[needed].any(0)
            grown = needed | live
            if torch.equal(grown, needed):
                break
            needed = grown
        live_ops = int(live[: self.n_ops].sum())
        kept = int((mask & needed[:, None]).sum())
        dense = int(self.allowed.sum())
        evals = self.nfe_mean if self.time == "continuous" else float(self.nfe)
        per_node = 2 + 9  # InstanceNorm (gamma, beta) + 3x3 kernel
        hw = self.last_hw
        return dict(
            params_dense=dense + per_node * self.n_ops,
            params_kept=kept + per_node * live_ops,
            flops_dense=round((dense + 9 * self.n_ops) * hw * evals),
            flops=round((kept + 9 * live_ops) * hw * evals),
            nodes=self.n_ops,
            dead_nodes=self.n_ops - live_ops,
            evaluations=evals,
        )

    def kept_counts(self, cx) -> dict:
        """``rwdet.complexity.sparse``'s protocol: ``sparse_counts()``, which needs nothing
        from the counter (the map size and NFE are the graph's own records of its forwards)."""
        return self.sparse_counts()

    def extra_repr(self) -> str:
        where = f"blocks={self.blocks}" if self.blocks else f"steps={self.steps}"
        if self.time == "continuous":
            where = f"{self.method} rtol={self.rtol} atol={self.atol} adjoint={self.adjoint}"
        return f"{self.time}, {self.wiring}, dim={self.dim}, edges={self.count}, {where}"


class _Dynamics(nn.Module):
    """``f(A_G Z)`` as torchdiffeq's ``func(t, z)``; counts its evaluations on the graph.

    Holds the graph outside the module tree (no parameter cycle); with ``weight=None`` the
    edges are chosen on each call, as the adjoint's vector-Jacobian products need."""

    def __init__(self, graph: TimedNeuralGraph, weight: torch.Tensor | None):
        super().__init__()
        object.__setattr__(self, "graph", graph)
        self.w = weight

    def forward(self, t, z):
        g = self.graph
        if g.solving:
            g.nfe += 1
        else:  # called by the adjoint's backward pass
            g.nfe_backward += 1
        return g.step(z, g.effective_weight() if self.w is None else self.w)


class NeuralGraphClassifier(StagedClassifier):
    """``g_phi`` -> neural graph -> ``h_psi``: one row of DNW Table 1 (module docstring).

    Args:
        time: "static", "discrete" or "continuous".
        wiring: "dnw" (learned) or "random" (RG, fixed by ``seed``; ``seed=None`` draws it
            from torch's global generator, so from the run's training seed).
        keep: fraction of the complete graph's ``dim^2`` edges kept (0.05 = prune_rate 0.95);
            the keyword was ``k`` before, and ``k=`` is refused with a pointer to ``keep``.
        dim, downsample_dim, feature_dim: nodes, input nodes, output nodes.
        blocks: static blocks (inputs and outputs included); steps: discrete time steps L.
        adjoint: continuous only, ``odeint_adjoint`` instead of backprop through the solver.
        rtol, atol, method: the ODE solver (footnote 4: dopri5, 1e-3).
        readout: "center" (the authors' 2x2 middle window) or "avg" (whole map).
    """

    input_size = 32  # CIFAR-10, the input of Table 1: what the model zoo counts it at

    def __init__(
        self,
        time: str = "static",
        wiring: str = "dnw",
        keep: float = 0.05,
        dim: int = 800,
        downsample_dim: int = 32,
        feature_dim: int = 100,
        blocks: int = 5,
        steps: int = 5,
        seed: int | None = 1,
        adjoint: bool = False,
        rtol: float = 1e-3,
        atol: float = 1e-3,
        method: str = "dopri5",
        readout: str = "center",
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.0,
        k: float | None = None,
    ):
        refuse_k(k, "NeuralGraphClassifier")
        super().__init__()
        check_num_classes(num_classes)
        dropout = check_dropout(dropout)
        if readout not in READOUTS:
            raise ValueError(f"readout={readout!r} is not known; use one of {READOUTS}")
        if adjoint and time != "continuous":
            raise ValueError(f"adjoint=True is for time='continuous', not {time!r}")
        mid = max(1, downsample_dim // 2)
        self.stem = nn.Sequential(  # g_phi, footnote 3
            nn.Conv2d(in_channels, mid, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid, bias=False),
            nn.Conv2d(mid, downsample_dim, 1, bias=False),
            nn.BatchNorm2d(downsample_dim),
        )
        self.graph = TimedNeuralGraph(
            time, wiring, keep, dim, downsample_dim, feature_dim, blocks, steps, seed, adjoint,
            rtol, atol, method,
        )  # fmt: skip
        self.readout = readout
        self.head = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.stage_names = ["stem", "graph"]
        self.stage_channels = {"stem": downsample_dim, "graph": feature_dim}
        self.stage_strides = {"stem": 4, "graph": 4}
        self.feature_channels = self.num_features = feature_dim
        self.fc = self.new_classifier(num_classes) if num_classes else nn.Identity()
        self.num_classes = num_classes

    def stage_steps(self):
        return [("stem", self.stem), ("graph", self.graph)]

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.readout == "avg":
            return self.head(F.adaptive_avg_pool2d(x, 1))
        h, w = x.shape[-2:]
        if min(h, w) < 2:
            raise ValueError(f"readout='center' needs a map of >= 2x2 pixels, got {h}x{w}")
        i, j = max(0, (h - 1) // 2 - 1), max(0, (w - 1) // 2 - 1)
        return self.head(x[..., i : i + 2, j : j + 2].mean((-2, -1), keepdim=True))

    def new_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes)


def _register(time: str):
    @register_model(f"neuralgraph_{time}", features=False)
    def build(**kw) -> NeuralGraphClassifier:
        return NeuralGraphClassifier(**{"time": time, **kw})

    build.__doc__ = f"DNW Table 1 tiny classifier, {time} neural graph (wiring dnw or random)"
    return build


for _time in TIMES:
    _register(_time)
