"""MobileNetV1-DNW and its random-graph baseline (DNW §2.4, Table 5, Table 3).

One *static neural graph* per resolution, with **channel-level** nodes:

- ``g_phi``: 3x3 conv, 32 channels, stride 2 (stride 1 with ``stem="small"``, the paper's
  CIFAR setting).
- graph ``G_i`` has blocks ``B_0 .. B_{L-1}``: ``B_0`` = input nodes (the previous graph's
  output channels), then ``L-1`` blocks of ``c_out`` nodes; edges only go from a block to a
  later block, so the longest path is ``L-1`` = MobileNetV1's number of pointwise layers at
  that resolution (13 in all). Node op: BN -> ReLU -> 3x3 depthwise conv (stride 2 on the input
  nodes where the resolution halves); output nodes have no op. Node counts are MobileNetV1 x1's
  (32+64, 64+2*128, 128+2*256, 256+6*512, 512+2*1024), whatever the width ``d``.
- edge budget of ``G_i``: MobileNetV1 x``d``'s pointwise edges at that resolution,
  ``round(d^2 * sum c_in*c_out)`` (channels ``c*d`` unrounded, as in the authors' release).
- ``h_psi``: BN -> ReLU -> global pool -> FC 1024 x classes. (Table 5 lists pool + FC; the
  BN-ReLU on the linear output nodes is from the authors' released model.) ``_small``: the FC
  is a DNW layer limited to MobileNetV1 x``d``'s FC edges (``1024*d*classes``), without bias
  (the authors' FC is then a bias-free 1x1 conv graph).
- graph weights start as the authors' (PyTorch's default for their 1x1 conv over all source
  nodes): ``U(-1/sqrt(n_src), 1/sqrt(n_src))``.

``wiring="dnw"`` chooses the real edges per step with ``rwdet.nn.choose.dnw_weight`` among the
*allowed* entries (the released code ranks the whole rectangle, so impossible entries could use
up budget; we exclude them as the paper describes). ``wiring="rg"``: the same rule applied once
to uniform random magnitudes drawn from ``seed`` (DNW §3 "RG"); the mask is a persistent buffer,
so the random graph travels in the checkpoint.

This is not a RandWire ``GraphStage``: a node is one channel, so the graph is tensorised as one
masked pointwise matrix per graph and run one block at a time.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from rwdet.graphs import stage_seed
from rwdet.models.interface import StagedClassifier, check_dropout, check_num_classes
from rwdet.models.registry import register_model
from rwdet.nn.choose import dnw_weight, topk_mask
from rwdet.nn.sparse_layers import DNWLinear

# stage name, input nodes, nodes per later block, pointwise layers (blocks - 1), stride
MOBILENET_GRAPHS = [
    ("conv1", 32, 64, 1, 1),
    ("conv2", 64, 128, 2, 2),
    ("conv3", 128, 256, 2, 2),
    ("conv4", 256, 512, 6, 2),
    ("conv5", 512, 1024, 2, 2),
]


def mobilenet_budget(c_in: int, c_out: int, layers: int, width: float) -> int:
    """Pointwise edges of MobileNetV1 x``width`` at one resolution (unrounded channels)."""
    edges = width * width * (c_in * c_out + (layers - 1) * c_out * c_out)
    return max(1, math.floor(edges + 0.5))


def block_allowed(blocks: list[int]) -> torch.Tensor:
    """Allowed entries of the (later-block nodes x earlier-block nodes) matrix."""
    rows, cols = sum(blocks[1:]), sum(blocks[:-1])
    allowed = torch.zeros(rows, cols, dtype=torch.bool)
    r = 0
    for j in range(1, len(blocks)):
        allowed[r : r + blocks[j], : sum(blocks[:j])] = True
        r += blocks[j]
    return allowed


class NeuralGraph(nn.Module):
    """One static neural graph at one resolution.

    ``weight[r, c]`` is the edge from source node ``c`` (blocks 0..L-2, in order) to target
    node ``r`` (blocks 1..L-1). ``forward(x)`` takes the input nodes' inputs (``blocks[0]``
    channels) and returns the output nodes' states (``blocks[-1]`` channels).

    wiring: "dnw" (learned), "rg" (random, fixed by ``seed``) or "fixed" (``mask`` given; the
    exported form).
    """

    def __init__(
        self,
        blocks: list[int],
        budget: int,
        stride: int = 1,
        wiring: str = "dnw",
        seed: int | None = None,
        mask: torch.Tensor | None = None,
    ):
        super().__init__()
        if wiring not in ("dnw", "rg", "fixed"):
            raise ValueError(f"wiring={wiring!r} is not known; use 'dnw' or 'rg'")
        if len(blocks) < 2 or min(blocks) < 1:
            raise ValueError(f"blocks={blocks} needs >= 2 non-empty blocks")
        self.blocks, self.stride, self.wiring = list(blocks), stride, wiring
        allowed = block_allowed(self.blocks)
        n_allowed = int(allowed.sum())
        if not 1 <= budget <= n_allowed:
            raise ValueError(f"edge budget {budget} is out of range [1, {n_allowed}]")
        self.budget = int(budget)
        self.register_buffer("allowed", allowed, persistent=False)
        rows, cols = allowed.shape
        # The authors' graph is a bias-free 1x1 nn.Conv2d over all source nodes, initialised
        # by PyTorch's default (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(cols), 1/sqrt(cols)).
        # The scale sets how far an SGD step moves |w| relative to its neighbours, i.e. how
        # fast edges swap early in training, so it follows the authors, not He's rule.
        bound = 1.0 / math.sqrt(cols)
        self.weight = nn.Parameter(torch.empty(rows, cols).uniform_(-bound, bound))
        if wiring == "rg":
            gen = torch.Generator().manual_seed(0 if seed is None else int(seed))
            magnitude = torch.rand(rows, cols, generator=gen)
            mask = topk_mask(magnitude, self.budget, allowed)
        if wiring != "dnw":
            if mask is None or mask.shape != allowed.shape:
                raise ValueError("wiring='fixed' needs a mask of the weight's shape")
            if bool((mask.bool() & ~allowed).any()):
                raise ValueError("mask keeps impossible edges (to the same or an earlier block)")
            self.register_buffer("mask", mask.float())
        self.ops = nn.ModuleList(
            nn.Sequential(
                nn.BatchNorm2d(b),
                nn.ReLU(),
                nn.Conv2d(b, b, 3, stride=stride if j == 0 else 1, padding=1, groups=b, bias=False),
            )
            for j, b in enumerate(self.blocks[:-1])
        )
        for op in self.ops:
            nn.init.kaiming_normal_(op[2].weight, mode="fan_in", nonlinearity="relu")

    def effective_weight(self) -> torch.Tensor:
        if self.wiring == "dnw":
            return dnw_weight(self.weight, self.budget, self.allowed)
        return self.weight * self.mask

    def kept_mask(self) -> torch.Tensor:
        if self.wiring == "dnw":
            return topk_mask(self.weight.abs(), self.budget, self.allowed).bool()
        return self.mask.bool()

    def block_slices(self) -> tuple[list[slice], list[slice | None]]:
        """Per block: its columns (as a source, None for the output block) and rows (as a
        target, None for the input block) in ``weight``."""
        cols, rows, c, r = [], [], 0, 0
        for j, b in enumerate(self.blocks):
            cols.append(slice(c, c + b) if j < len(self.blocks) - 1 else None)
            rows.append(slice(r, r + b) if j > 0 else None)
            c += b if j < len(self.blocks) - 1 else 0
            r += b if j > 0 else 0
        return cols, rows

    @torch.no_grad()
    def live_nodes(self, needed_out: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Which nodes do work at inference, given which output nodes are used downstream.

        Returns ``(src_live, dst_needed)``: ``src_live[c]`` — source node ``c`` (it has an op)
        has a real edge to a needed node; ``dst_needed[r]`` — target node ``r`` is used. A node
        with no real path to a used output is dead: its op is skipped, its edges removed.
        """
        mask = self.kept_mask() if mask is None else mask
        cols, rows = self.block_slices()
        dst_needed = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
        src_live = torch.zeros(mask.shape[1], dtype=torch.bool, device=mask.device)
        last = rows[-1]
        dst_needed[last] = True if needed_out is None else needed_out.to(mask.device)
        for j in range(len(self.blocks) - 2, -1, -1):
            src_live[cols[j]] = (mask[:, cols[j]] & dst_needed[:, None]).any(0)
            if j > 0:
                dst_needed[rows[j]] = src_live[cols[j]]
        return src_live, dst_needed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The aggregation is the node-level one, ``I_r = sum_c w[r, c] * Z_c`` (DNW §2.1,
        eq. 1), but over *channel* nodes, so it is written here as a matrix product and not
        through ``rwdet.nn.aggregate.weighted_sum``: each ``Z_c`` is one channel, a block has
        hundreds to thousands of them, and the sum for every later node at once is one 1x1
        convolution of the block's outputs with its column block of ``w`` (a GEMM). Per
        target node, ``weighted_sum`` would be one call per channel with as many 1-channel
        parents; its ``dL/dw = <Z_c, dL/dI_r>`` is exactly what the convolution's weight
        gradient computes, for all ``(r, c)`` in one product."""
        w = self.effective_weight()
        acc = None  # inputs of the blocks not yet run, concatenated
        row = col = 0
        for j, op in enumerate(self.ops):
            b = self.blocks[j]
            inp, rest = (x, None) if j == 0 else (acc[:, :b], acc[:, b:])
            z = op(inp)
            contrib = F.conv2d(z, w[row:, col : col + b, None, None])
            acc = contrib if rest is None else rest + contrib
            col += b
            row += self.blocks[j + 1]
        return acc

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, budget={self.budget}, stride={self.stride}, {self.wiring}"

    @torch.no_grad()
    def kept_counts(self, cx) -> dict:
        """For ``rwdet.complexity.sparse``: params and multiply-adds of the graph and its node
        ops, dense (every allowed edge, every node) and kept (chosen edges into needed nodes,
        ops of live nodes; ``cx.used``: the output nodes used downstream). Per pixel of the
        graph's output map (``cx.out_shape``): one multiply-add per edge, 9 per 3x3 depthwise
        op; BN costs none (the papers' convention)."""
        hw = int(cx.out_shape[-1] * cx.out_shape[-2])
        mask = self.kept_mask()
        src_live, dst_needed = self.live_nodes(cx.used, mask)
        kept_edges = int(mask.sum(1)[dst_needed].sum())
        n_src, live = src_live.numel(), int(src_live.sum())
        per_node_params = 2 + 9  # BN (gamma, beta) + 3x3 depthwise kernel
        dense_edges = int(self.allowed.sum())
        return dict(
            params_dense=dense_edges + per_node_params * n_src,
            params_kept=kept_edges + per_node_params * live,
            flops_dense=(dense_edges + 9 * n_src) * hw,
            flops=(kept_edges + 9 * live) * hw,
            nodes=n_src,
            dead_nodes=n_src - live,
        )


class MobileNetV1DNW(StagedClassifier):
    """MobileNetV1-DNW (``wiring="dnw"``) or MobileNetV1-RG (``wiring="rg"``), Table 5.

    Args:
        width: d, the MobileNetV1 width multiplier whose pointwise edge count is the budget.
        small: DNW-Small — the FC is also limited to MobileNetV1 x d's FC edges.
        seed: the random graphs of ``wiring="rg"`` (graph i from ``stage_seed(seed, i)``, the
            stage-seed function every rwdet model uses).
        stem: "imagenet" (g_phi stride 2, output stride 32) or "small" (stride 1, CIFAR).
        node_multiplier: scales every node count (1.0 = the paper's MobileNetV1 x1 counts;
            smaller values give quick test models with the same structure).
        num_classes: 0 builds no classifier (the model returns pooled ``num_features``).
        dropout: before the FC (timm's ``drop_rate``; the paper uses none).
    """

    def __init__(
        self,
        width: float = 0.225,
        small: bool = False,
        wiring: str = "dnw",
        seed: int = 1,
        num_classes: int = 1000,
        in_channels: int = 3,
        stem: str = "imagenet",
        node_multiplier: float = 1.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_num_classes(num_classes)
        dropout = check_dropout(dropout)
        if not isinstance(node_multiplier, (int, float)) or not 0.0 < node_multiplier <= 4.0:
            raise ValueError(f"node_multiplier={node_multiplier!r} must be in (0, 4]")
        if not isinstance(width, (int, float)) or not 0.0 < width <= 1.0:
            raise ValueError(f"width={width!r} must be a multiplier in (0, 1]")
        if wiring not in ("dnw", "rg"):
            raise ValueError(f"wiring={wiring!r} is not known for MobileNetV1-DNW; use dnw or rg")
        if small and wiring != "dnw":
            raise ValueError("small=True limits the FC by DNW; it needs wiring='dnw'")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem={stem!r} is not known; use 'imagenet' or 'small'")
        s1 = 2 if stem == "imagenet" else 1

        def nodes(c: int) -> int:
            return max(1, round(c * node_multiplier))

        plan = [(n, nodes(ci), nodes(co), L, s) for n, ci, co, L, s in MOBILENET_GRAPHS]
        self.stem = nn.Conv2d(in_channels, plan[0][1], 3, stride=s1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.stem.weight, mode="fan_out", nonlinearity="relu")
        self.stage_names = [name for name, *_ in plan]
        self.stage_channels, self.stage_strides = {}, {}
        stride = s1
        for i, (name, c_in, c_out, layers, s) in enumerate(plan):
            budget = mobilenet_budget(c_in, c_out, layers, width)
            blocks = [c_in] + [c_out] * layers
            graph = NeuralGraph(blocks, budget, s, wiring, seed=stage_seed(seed, i))
            setattr(self, name, graph)
            stride *= s
            self.stage_channels[name], self.stage_strides[name] = c_out, stride
        last = plan[-1][2]
        self.head = nn.Sequential(
            nn.BatchNorm2d(last), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1)
        )
        self.width, self.small, self.wiring = width, small, wiring
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = self.new_classifier(num_classes, last) if num_classes else nn.Identity()
        self.feature_channels = self.num_features = last
        self.num_classes = num_classes

    @torch.no_grad()
    def sparse_liveness(self) -> dict[str, torch.Tensor]:
        """Used output channels of each graph and of the stem, chained back from the FC
        (for ``rwdet.complexity.sparse`` and ``rwdet.nn.export``).

        A last-graph output node with no real in-edge is 0, so its head path BN -> ReLU ->
        pool is a constant that folds into the FC bias (in eval mode): it is not "used"."""
        if isinstance(self.fc, DNWLinear):
            needed = self.fc.kept_mask().any(0)
        else:  # a dense FC, or none (num_classes=0: every pooled feature is an output)
            needed = torch.ones(self.num_features, dtype=torch.bool, device=self.stem.weight.device)
        last = getattr(self, self.stage_names[-1])
        needed = needed & last.kept_mask()[last.block_slices()[1][-1]].any(1)
        out = {"head.0": needed, "fc": needed}  # only the used outputs reach the head
        for name in reversed(self.stage_names):
            graph = getattr(self, name)
            out[name] = needed
            src_live, _ = graph.live_nodes(needed)
            needed = src_live[: graph.blocks[0]]
        out["stem"] = needed
        return out

    @torch.no_grad()
    def export_pruned(self) -> MobileNetV1DNW:
        """A copy for inference: each graph frozen (``wiring="fixed"``) with its dead nodes
        removed — their channels cut from the depthwise convs, the BNs, the pointwise matrix,
        the stem and the FC — as the authors' "fast eval" does. Same outputs in eval mode (up to
        float summation order). ``rwdet.nn.export.export_subnetwork`` calls this."""
        if self.num_classes == 0:
            raise ValueError("export_pruned folds dead outputs into the FC; build with classes")
        new = copy.deepcopy(self)
        needed = self.sparse_liveness()

        def keep(flags: torch.Tensor) -> torch.Tensor:
            idx = flags.nonzero().flatten()
            return idx if idx.numel() else idx.new_zeros(1)  # never empty

        prev = keep(needed["stem"])
        new.stem = _slice_conv(self.stem, prev)
        for name in self.stage_names:
            g = getattr(self, name)
            mask = g.kept_mask()
            src_live, _ = g.live_nodes(needed[name], mask)
            cols, rows = g.block_slices()
            keeps = [keep(src_live[cols[j]]) for j in range(len(g.blocks) - 1)]
            keeps.append(keep(needed[name]))
            assert torch.equal(keeps[0], prev), "graph chain liveness is inconsistent"
            src = torch.cat([cols[j].start + keeps[j] for j in range(len(keeps) - 1)])
            dst = torch.cat([rows[j].start + keeps[j] for j in range(1, len(keeps))])
            sub_mask = mask[dst][:, src]
            blocks = [len(k) for k in keeps]
            graph = NeuralGraph(
                blocks, max(1, int(sub_mask.sum())), g.stride, "fixed", mask=sub_mask
            )
            graph.weight.copy_(g.effective_weight()[dst][:, src])
            for j, (op, old) in enumerate(zip(graph.ops, g.ops)):
                _copy_bn(op[0], old[0], keeps[j])
                op[2].weight.copy_(old[2].weight[keeps[j]])
            setattr(new, name, graph)
            new.stage_channels[name] = blocks[-1]
            prev = keeps[-1]
        new.head[0] = nn.BatchNorm2d(len(prev))
        _copy_bn(new.head[0], self.head[0], prev)
        weight = self.fc.masked_weight() if isinstance(self.fc, DNWLinear) else self.fc.weight
        new.fc = nn.Linear(len(prev), self.fc.out_features)  # a bias to fold constants into
        new.fc.weight.copy_(weight[:, prev])
        # Dropped outputs are constant zeros: fold BN(0) -> ReLU (the pooled value) into the bias.
        bn = self.head[0]
        constant = torch.relu(
            bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)
        )
        dropped = torch.ones_like(constant, dtype=torch.bool)
        dropped[prev] = False
        bias = self.fc.bias if self.fc.bias is not None else torch.zeros_like(new.fc.bias)
        new.fc.bias.copy_(bias + weight[:, dropped] @ constant[dropped])
        new.feature_channels = new.num_features = len(prev)
        return new

    def stage_steps(self):
        first, *rest = self.stage_names
        steps = [(first, lambda x: getattr(self, first)(self.stem(x)))]
        return steps + [(name, getattr(self, name)) for name in rest]

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def new_classifier(self, num_classes: int, in_features: int | None = None) -> nn.Module:
        n = self.num_features if in_features is None else in_features
        if self.small:  # the authors' DNW-Small FC is a graph too: a bias-free 1x1 conv
            return DNWLinear(n, num_classes, bias=False, keep=self.width)
        return nn.Linear(n, num_classes)


def _slice_conv(conv: nn.Conv2d, rows: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(
        conv.in_channels, len(rows), conv.kernel_size, conv.stride, conv.padding, bias=False
    )
    new.weight.data.copy_(conv.weight.data[rows])
    return new


def _copy_bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for key in ("weight", "bias", "running_mean", "running_var"):
        getattr(dst, key).data.copy_(getattr(src, key).data[idx])
    dst.num_batches_tracked.copy_(src.num_batches_tracked)
    dst.eps, dst.momentum = src.eps, src.momentum


def _register(name: str, **fixed):
    @register_model(name)
    def build(**kw) -> MobileNetV1DNW:
        return MobileNetV1DNW(**{**fixed, **kw})

    build.__doc__ = f"MobileNetV1-DNW family, Table 3: {fixed}"
    return build


for _tag, _d in (("x015", 0.15), ("x0225", 0.225), ("x03", 0.3), ("x049", 0.49)):
    if _tag != "x015":
        _register(f"mobilenetv1_dnw_{_tag}", width=_d, wiring="dnw")
        _register(f"mobilenetv1_rg_{_tag}", width=_d, wiring="rg")
    if _tag in ("x015", "x0225"):
        _register(f"mobilenetv1_dnw_small_{_tag}", width=_d, wiring="dnw", small=True)
