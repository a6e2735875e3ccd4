"""The two edge-choice rules (rwdet.nn.choose): exact counts, ties, impossible edges, gradients."""

import pytest
import torch

from rwdet.nn.choose import dnw_weight, kept_count, popup_mask, topk_mask


@pytest.mark.parametrize(
    "k,n,expected",
    [
        (0.3, 10, 3),
        (0.25, 10, 3),
        (0.35, 10, 4),
        (0.5, 3, 2),
        (0.1, 4, 1),
        (0.01, 10, 1),
        (1.0, 7, 7),
    ],
)
def test_kept_count_rounds_half_up_and_keeps_at_least_one(k, n, expected):
    assert kept_count(k, n) == expected


@pytest.mark.parametrize("k", [0.0, -0.1, 1.5, "0.3", True])
def test_kept_count_rejects_fractions_outside_0_1(k):
    with pytest.raises(ValueError, match="fraction of weights KEPT"):
        kept_count(k, 10)


@pytest.mark.parametrize(
    "n,count", [(10, 0), (10, 1), (10, 3), (10, 5), (10, 7), (10, 10), (1001, 700)]
)
def test_exact_count_with_all_values_tied(n, count):
    # Every value equal: a threshold rule would keep all or nothing; topk keeps exactly count.
    mask = topk_mask(torch.ones(n), count)
    assert int(mask.sum()) == count
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_exact_count_with_ties_at_the_boundary_and_largest_kept():
    values = torch.tensor([5.0, 1.0, 3.0, 3.0, 3.0, 0.5, 3.0, 9.0])
    for count in range(len(values) + 1):
        mask = topk_mask(values, count)
        assert int(mask.sum()) == count
        kept, dropped = values[mask.bool()], values[~mask.bool()]
        if count and len(dropped):
            assert kept.min() >= dropped.max()


def test_impossible_entries_are_never_chosen_even_when_largest():
    torch.manual_seed(0)
    values = torch.rand(6, 7)
    allowed = torch.rand(6, 7) > 0.5
    values[~allowed] += 100.0  # the impossible entries are by far the largest
    n_allowed = int(allowed.sum())
    for count in (1, n_allowed // 2, n_allowed - 1, n_allowed):
        mask = topk_mask(values, count, allowed).bool()
        assert int(mask.sum()) == count
        assert not (mask & ~allowed).any()
    with pytest.raises(ValueError, match="allowed entries"):
        topk_mask(values, n_allowed + 1, allowed)


def test_dnw_forward_uses_real_edges_and_every_allowed_weight_gets_the_gradient():
    w = torch.tensor([[0.9, -0.1, 0.5], [-0.7, 0.2, 0.05]], requires_grad=True)
    allowed = torch.tensor([[True, True, True], [True, True, False]])
    eff = dnw_weight(w, 3, allowed)
    assert torch.equal(eff.detach(), torch.tensor([[0.9, 0.0, 0.5], [-0.7, 0.0, 0.0]]))
    upstream = torch.arange(6.0).view(2, 3) + 1
    eff.backward(upstream)
    # Straight through for allowed entries (real or hallucinated), nothing for the impossible one.
    assert torch.equal(w.grad, upstream * allowed)


def test_popup_mask_is_straight_through_to_abs_scores():
    scores = torch.tensor([0.3, -0.8, 0.1, -0.05], requires_grad=True)
    mask = popup_mask(scores, 2)
    assert mask.tolist() == [1.0, 1.0, 0.0, 0.0]  # by |score|, not by signed score
    mask.backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert scores.grad.tolist() == [1.0, -2.0, 3.0, -4.0]  # identity through h, then d|s|/ds
