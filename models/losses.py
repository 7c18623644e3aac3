"""Training losses of the online learner, as per-sample vectors (the caller weights them).

Shapes: B samples, C candidates, N catalogue indices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bpr_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean pairwise BPR loss [B] of each sample's target column ``labels`` [B] against
    every other candidate of ``scores`` [B, C]."""
    pos = scores.gather(1, labels.unsqueeze(1))  # [B, 1]
    neg_mask = torch.ones_like(scores).scatter(1, labels.unsqueeze(1), 0.0)
    pairwise = -F.logsigmoid(pos - scores) * neg_mask
    return pairwise.sum(dim=1) / neg_mask.sum(dim=1).clamp(min=1.0)


def sampled_softmax_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    logq_weight: float,
) -> torch.Tensor:
    """Softmax cross-entropy [B] over sampled candidates ``scores`` [B, C] with the logQ
    correction: candidates are drawn roughly in proportion to popularity (in-batch
    positives), so each is discounted by ``logq_weight * log_q`` [C], its log sampling
    probability."""
    logits = scores / temperature - logq_weight * log_q.unsqueeze(0)
    return F.cross_entropy(logits, labels, reduction="none")


def full_softmax_loss(
    scores: torch.Tensor, targets: torch.Tensor, excluded: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Softmax cross-entropy [B] of each target column ``targets`` [B] against every item
    of ``scores`` [B, N] that is not ``excluded`` [B, N] (bool: what the ranking leaves
    out, e.g. the user's known items); the target always competes."""
    out = excluded.scatter(1, targets.unsqueeze(1), False)
    logits = (scores / temperature).masked_fill(out, -1e9)
    return F.cross_entropy(logits, targets, reduction="none")


def head_loss(
    blended: torch.Tensor,
    masked: torch.Tensor,
    targets: torch.Tensor,
    head: int,
    temperature: float,
) -> torch.Tensor:
    """Per-sample softmax loss [B] of blended scores [B, N] over each sample's ``head``
    best items + its target (``head`` <= 0: the whole catalogue). ``masked`` [B, N]:
    ``blended`` detached with what is out of play (history, padding, holes) at -inf, as
    ranked; the target always competes, even if out of play."""
    t = temperature
    t_col = targets.unsqueeze(1)
    if head <= 0:
        logits = (blended / t).masked_fill(torch.isinf(masked), -1e9)
        logits = logits.scatter(1, t_col, blended.gather(1, t_col) / t)
        return F.cross_entropy(logits, targets, reduction="none")
    # Only the ranking near the top matters (Recall@K, NDCG@K): each sample's softmax
    # runs over the current `head` best items + its target, and only samples whose
    # target is already among them count. Over the whole catalogue the likelihood of
    # the many targets without transition evidence drags the memory's weight down.
    # The [B, N] work is done without autograd, on the scores the batch was ranked
    # with (the head is the same set at any positive temperature); the loss and its
    # backward run over the [R, head + 1] logits of the R counted samples (the softmax
    # over the masked catalogue with everything outside the head at -1e9 is the same:
    # exp(-1e9) = 0).
    with torch.no_grad():
        t_score = blended.detach().gather(1, t_col)  # [B, 1]
        rows = torch.nonzero((masked > t_score).sum(dim=1) < head).squeeze(1)  # [R]
        t_rows = t_col[rows]  # [R, 1]
        in_play = masked[rows].scatter_(1, t_rows, t_score[rows])  # [R, N]
        # (a set: unsorted selection is cheaper, and it is this loss's largest cost)
        top = torch.topk(in_play, min(head, in_play.shape[1]), dim=1, sorted=False).indices
        # Each counted sample's head + its target (a target in the head already is
        # pointed at twice: its second column is left out of the softmax).
        cols = torch.cat([top, t_rows], dim=1)  # [R, head + 1]
        off = torch.isinf(in_play.gather(1, cols))  # (fewer items in play than the head)
        off[:, -1] |= (top == t_rows).any(dim=1)
    picked = (blended[rows.unsqueeze(1), cols] / t).masked_fill(off, -1e9)  # [R, head + 1]
    ce = torch.logsumexp(picked, dim=1) - blended[rows, targets[rows]] / t
    return blended.new_zeros(len(targets)).index_put((rows,), ce)
