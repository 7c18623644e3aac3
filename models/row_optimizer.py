"""Row-wise optimizers of the id embeddings: each step updates the touched rows only.

An id row is ``[embedding D | optimizer slots K | ...]`` in the item table; the slots are
the row's own optimizer state, so a row's update needs nothing but the row (checkpointed
and restored with it). The dense towers use torch.optim instead.
"""

from __future__ import annotations

import torch

ADAGRAD_EPS = 1e-10
ADAGRAD_INIT = 0.1


def optimizer_slots(optimizer: str, dim: int) -> int:
    """Per-row optimizer state width K: AdaGrad 1 (row-wise), SGD 0, Adam 2*D + 1 (m, v, t)."""
    return {"adagrad": 1, "sgd": 0, "adam": 2 * dim + 1}[optimizer]


def row_step(
    data: torch.Tensor, rows: torch.Tensor, grad: torch.Tensor, optimizer: str, lr: float, d: int
) -> None:
    """One step of ``optimizer`` on id rows ``rows`` [R] of table ``data`` [N, W] in place,
    from their embedding gradients ``grad`` [R, D].

    AdaGrad keeps one accumulator per row (the mean squared gradient over D: row-wise
    AdaGrad, a D-th of the state of per-coordinate AdaGrad); Adam is lazy (a row's moments
    and step count advance only when the row is touched)."""
    with torch.no_grad():
        if optimizer == "adagrad":
            acc = data[rows, d] + grad.pow(2).mean(dim=1)  # row-wise accumulator
            data[rows, d] = acc
            data[rows, :d] -= lr * grad / (acc.sqrt().unsqueeze(1) + ADAGRAD_EPS)
        elif optimizer == "sgd":
            data[rows, :d] -= lr * grad
        else:  # lazy Adam on rows: m [D], v [D], t [1] per row
            b1, b2, eps = 0.9, 0.999, 1e-8
            m = data[rows, d : 2 * d] * b1 + (1 - b1) * grad
            v = data[rows, 2 * d : 3 * d] * b2 + (1 - b2) * grad.pow(2)
            t = data[rows, 3 * d] + 1
            data[rows, d : 2 * d] = m
            data[rows, 2 * d : 3 * d] = v
            data[rows, 3 * d] = t
            mhat = m / (1 - b1 ** t.unsqueeze(1))
            vhat = v / (1 - b2 ** t.unsqueeze(1))
            data[rows, :d] -= lr * mhat / (vhat.sqrt() + eps)
