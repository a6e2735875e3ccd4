"""The two edge-choice rules, as small autograd pieces every layer and graph reuses.

**DNW** (Wortsman et al. 2019, Algorithm 1): the real edges are the ``count`` allowed entries
with the largest ``|w|``; the forward pass uses ``w * mask``. In the backward pass every allowed
weight, real or hallucinated, receives the full gradient ``dL/dw_eff`` (for an aggregation
``I_v = sum w_uv Z_u`` that is ``<Z_u, dL/dI_v>``, so an SGD step is line 10 of Algorithm 1).
The gradient *to the inputs* is the ordinary gradient of ``w_eff``, which is zero on
hallucinated edges: the gradient flows *to* them but not *through* them, with no extra code.

**edge-popup** (Ramanujan et al. 2020, §3): the weights are fixed; each has a score; the mask
keeps the ``count`` entries with the largest ``|score|`` and the gradient goes straight through
the mask to ``|score|`` (then, by the chain rule, to ``score`` times its sign — as in the
authors' ``GetSubnet`` applied to ``scores.abs()``).

Conventions, stated once for the whole library:

- ``keep`` is the fraction of weights **kept** (edge-popup's "% of weights", the papers' ``k``;
  DNW Table 4's "Weights (%)"), never the fraction pruned; public implementations disagree on
  this. The keyword is ``keep`` everywhere in rwdet, not the papers' ``k``: ``k`` is already
  the Watts-Strogatz neighbour count (``gen_params.k``, ``--k``, ``MODEL.RWDET.K``), and one
  API must not give one name two meanings. ``k=`` is refused with a pointer (``refuse_k``).
- ``count = kept_count(keep, n) = floor(keep * n + 1/2)`` (round half up), clamped to
  ``[1, n]``.
- Exactly ``count`` entries are kept even when values tie: the mask is built from ``topk``
  indices, never from a threshold. Which of several tied entries wins is up to ``torch.topk``
  (the same on every DDP rank, since ranks hold identical values).
- ``topk`` of ``count`` (or of the ``n - count`` smallest, whichever is fewer) replaces the
  full sort of the reference implementations.
- Under tracing, scripting and ONNX export (``rwdet.nn.aggregate.exporting``) both rules run
  their forward only, as plain tensor ops; ``rwdet.nn.export.export_subnetwork`` first turns
  the chosen subnetwork into fixed dense layers, which is what ``tools/export.py`` traces.
"""

from __future__ import annotations

import math
import numbers

import torch

from rwdet.nn.aggregate import exporting
from rwdet.run.errors import UserError


def kept_count(keep: float, n: int) -> int:
    """Number of entries kept from ``n`` at fraction ``keep``: ``round(keep*n)``, half up, >= 1."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(
            f"keep={keep!r} is out of range; keep is the fraction of weights KEPT, a number in "
            f"(0, 1] (e.g. 0.3 keeps 30%)"
        )
    if n < 1:
        raise ValueError(f"cannot choose among n={n} entries; a layer needs at least one weight")
    return max(1, min(n, math.floor(float(keep) * n + 0.5)))


def refuse_k(k, owner: str) -> None:
    """Refuse the old keyword ``k`` of the fraction kept, naming the new one (module docstring);
    ``k`` defaults to None in every signature that used to take it, so only a caller who
    passes it reaches the error."""
    if k is not None:
        raise UserError(
            f"{owner}: k={k!r} is no longer the fraction kept; pass keep={k!r} (rwdet's k is "
            f"only the Watts-Strogatz neighbour count, gen_params.k)"
        )


@torch.no_grad()
def topk_mask(values: torch.Tensor, count: int, allowed: torch.Tensor | None = None):
    """0/1 mask (dtype and shape of ``values``) with exactly ``count`` ones on the largest
    ``values`` among the ``allowed`` entries (all entries when ``allowed`` is None)."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if allowed is not None:
        if allowed.shape != values.shape:
            raise ValueError(
                f"allowed mask has shape {tuple(allowed.shape)}, values {tuple(values.shape)}"
            )
        # A meta tensor (shape-only runs, ``rwdet.complexity``) has no count to check against.
        n_allowed = n if allowed.is_meta else int(allowed.sum())
        # Impossible entries sink below every real value, so they are never among the top
        # ``count`` (and are the first to go in the complement branch).
        flat = flat.masked_fill(~allowed.reshape(-1).bool(), -math.inf)
    else:
        n_allowed = n
    if not 0 <= count <= n_allowed:
        raise ValueError(f"cannot keep count={count} of {n_allowed} allowed entries")
    if count <= n - count:
        mask = torch.zeros_like(flat)
        if count:
            mask[flat.topk(count, sorted=False).indices] = 1
    else:
        mask = torch.ones_like(flat)
        if n - count:
            mask[flat.topk(n - count, largest=False, sorted=False).indices] = 0
    return mask.view_as(values)


class _DNWStraightThrough(torch.autograd.Function):
    """forward ``w * mask``; backward: the full gradient to every allowed ``w``."""

    @staticmethod
    def forward(ctx, w, mask, allowed):
        ctx.save_for_backward(allowed)
        return w * mask

    @staticmethod
    def backward(ctx, grad):
        (allowed,) = ctx.saved_tensors
        if allowed.numel():
            grad = grad * allowed
        return grad, None, None


def dnw_weight(w: torch.Tensor, count: int, allowed: torch.Tensor | None = None):
    """DNW's effective weight: the ``count`` largest-``|w|`` allowed entries, others zero.

    Hallucinated (allowed, unchosen) entries get the full gradient; impossible (disallowed)
    entries get none, so they stay out of the optimizer's way as well as out of the forward.
    """
    mask = topk_mask(w.abs(), count, allowed)
    if exporting():  # tracers record no Python autograd op; the forward is just this
        return w * mask
    if allowed is None:
        empty = torch.empty(0, dtype=w.dtype, device=w.device)
        return _DNWStraightThrough.apply(w, mask, empty)
    return _DNWStraightThrough.apply(w, mask, allowed.to(w.dtype))


class _PopupStraightThrough(torch.autograd.Function):
    """forward: the top-``count`` mask of its input (per group, if groups are given);
    backward: identity (straight through)."""

    @staticmethod
    def forward(ctx, magnitude, count, groups):
        if groups is None:
            return topk_mask(magnitude, count)
        mask = torch.zeros_like(magnitude)
        for index, n_kept in groups:
            mask[index] = topk_mask(magnitude[index], n_kept)
        return mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def popup_mask(scores: torch.Tensor, count: int, groups=None) -> torch.Tensor:
    """edge-popup's subnetwork mask from ``|scores|``, with a straight-through gradient.

    ``groups``: optional ``[(indices, count), ...]`` partitioning a flat ``scores`` into
    layers that each keep their own top ``count`` (then ``count`` is ignored)."""
    if exporting():  # tracers record no Python autograd op; the forward is just the mask
        return _PopupStraightThrough.forward(None, scores.abs(), count, groups)
    return _PopupStraightThrough.apply(scores.abs(), count, groups)


# ---------------------------------------------------------------------------- supermask
# Zhou et al. 2019, as edge-popup §2 and §3.1 describe it: every weight has a score s, the
# probability of keeping it is p = sigmoid(s), and each forward pass in training uses a fresh
# mask m ~ Bernoulli(p); the gradient goes straight through the sample to p (then through the
# sigmoid to s), as in the authors' ``StraightThroughBinomialSample``. No keep: the expected
# fraction kept is mean(p), which the optimisation decides (§4.6: "no explicit choice").
#
# Evaluation: neither the edge-popup paper nor the authors' code (which samples in evaluation
# too, so every evaluation sees another network) fixes a deterministic rule. rwdet evaluates
# the most probable mask, ``p > 0.5`` (``"threshold"``, the default): it is reproducible, it is
# a binary subnetwork (so it can be counted and exported like a popup one), and it is the mask
# the training distribution concentrates on as p saturates. ``"expected"`` (``w * p``, not a
# subnetwork) and ``"sample"`` (the authors' stochastic evaluation) remain selectable.
SUPERMASK_EVAL = ("threshold", "expected", "sample")


class _BernoulliStraightThrough(torch.autograd.Function):
    """forward: a 0/1 sample with P(1) = its input; backward: identity (straight through)."""

    @staticmethod
    def forward(ctx, prob):
        return torch.bernoulli(prob)

    @staticmethod
    def backward(ctx, grad):
        return grad


def check_supermask_eval(eval_mask: str) -> None:
    if eval_mask not in SUPERMASK_EVAL:
        raise ValueError(
            f"eval_mask={eval_mask!r} is not known; choose one of {list(SUPERMASK_EVAL)}"
        )


def supermask_mask(scores: torch.Tensor, training: bool, eval_mask: str = "threshold"):
    """Zhou et al.'s mask from ``scores`` (see above): a straight-through Bernoulli(sigmoid)
    sample in training, ``eval_mask``'s deterministic (or sampled) mask otherwise."""
    check_supermask_eval(eval_mask)
    if training or eval_mask == "sample":
        prob = torch.sigmoid(scores)
        if exporting():
            return torch.bernoulli(prob)
        return _BernoulliStraightThrough.apply(prob)
    if eval_mask == "expected":
        return torch.sigmoid(scores)
    return (scores > 0).to(scores.dtype)  # sigmoid(s) > 0.5  <=>  s > 0
