"""Losses (models/losses.py) and row optimizers (models/row_optimizer.py) on their own."""

import math

import torch

from models.losses import bpr_loss, full_softmax_loss, head_loss, sampled_softmax_loss
from models.row_optimizer import ADAGRAD_EPS, optimizer_slots, row_step


def test_sampled_softmax_discounts_popular_candidates_by_log_q():
    scores = torch.tensor([[1.0, 1.0]])
    labels = torch.tensor([0])
    plain = sampled_softmax_loss(scores, labels, torch.zeros(2), 1.0, 1.0)
    assert math.isclose(plain.item(), math.log(2.0), rel_tol=1e-6)
    # The target was the popular one (higher sampling probability): its logit drops.
    popular = sampled_softmax_loss(scores, labels, torch.log(torch.tensor([0.9, 0.1])), 1.0, 1.0)
    assert popular.item() > plain.item()


def test_bpr_is_small_when_the_target_leads_and_large_when_it_trails():
    labels = torch.tensor([0, 0])
    loss = bpr_loss(torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 5.0]]), labels)
    assert loss[0] < 0.01 < 4.0 < loss[1]


def test_full_softmax_leaves_out_the_excluded_items_but_the_target():
    scores = torch.tensor([[2.0, 9.0, 1.0, 0.0]])
    excluded = torch.tensor([[True, True, False, False]])  # padding, a known item
    got = full_softmax_loss(scores, torch.tensor([2]), excluded, temperature=1.0)
    want = torch.logsumexp(torch.tensor([1.0, 0.0]), 0) - 1.0
    assert math.isclose(got.item(), want.item(), rel_tol=1e-6)
    # An excluded target still competes (it is what the user chose).
    known = full_softmax_loss(scores, torch.tensor([1]), excluded, temperature=1.0)
    want = torch.logsumexp(torch.tensor([9.0, 1.0, 0.0]), 0) - 9.0
    assert math.isclose(known.item(), want.item(), abs_tol=1e-6)


def test_head_loss_counts_only_targets_in_the_head():
    blended = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0]], requires_grad=True)
    masked = blended.detach().clone()
    targets = torch.tensor([1, 3])  # second in the head of 2; last, outside it
    loss = head_loss(blended, masked, targets, head=2, temperature=1.0)
    want = torch.logsumexp(torch.tensor([3.0, 2.0]), 0) - 2.0
    assert math.isclose(loss[0].item(), want.item(), rel_tol=1e-6) and loss[1].item() == 0.0
    full = head_loss(blended, masked, targets, head=0, temperature=1.0)
    ce = torch.nn.functional.cross_entropy(blended.detach(), targets, reduction="none")
    torch.testing.assert_close(full.detach(), ce)


def test_row_steps_touch_only_their_rows():
    d = 2
    for opt in ("sgd", "adagrad", "adam"):
        data = torch.zeros(3, d + optimizer_slots(opt, d) + 1)
        data[:, d] = 0.1 if opt == "adagrad" else 0.0
        before = data.clone()
        grad = torch.tensor([[1.0, -1.0]])
        row_step(data, torch.tensor([1]), grad, opt, 0.5, d)
        assert torch.equal(data[[0, 2]], before[[0, 2]]), opt
        assert data[1, 0] < 0 < data[1, 1], opt  # against the gradient
        assert torch.equal(data[1, -1], before[1, -1]), opt  # columns past the slots kept
    data = torch.zeros(1, d + 1)
    data[0, d] = 0.1
    row_step(data, torch.tensor([0]), torch.tensor([[1.0, 1.0]]), "adagrad", 0.5, d)
    assert math.isclose(data[0, d].item(), 1.1, rel_tol=1e-6)  # + mean squared gradient
    assert math.isclose(data[0, 0].item(), -0.5 / (math.sqrt(1.1) + ADAGRAD_EPS), rel_tol=1e-6)
