"""Adaptive softmax over a growing, frequency-sorted catalogue.

``torch.nn.AdaptiveLogSoftmaxWithLoss`` is fastest (and most accurate) when frequent
classes are in the head cluster. Items get the next free class when first seen (the
catalogue grows); every ``trainer.adaptive_resort_steps`` steps classes are re-assigned
by frequency, and each item's output weights move with it - row by row in the head
shortlist and within a tail cluster (optimizer state included). An item that changes
cluster restarts its output row (the clusters have different widths).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from models.catalog import Catalog

IntArray = npt.NDArray[np.int64]


def assign_new_classes(cat: Catalog, idx: IntArray, n_classes: int) -> None:
    """Give items without a class the next free classes (growing); none past capacity."""
    used = int(cat.asm_class[: cat.size].max(initial=-1)) + 1
    for i in idx.tolist():
        if cat.asm_class[i] < 0 and used < n_classes:
            cat.asm_class[i] = used
            used += 1


def _locate(asm: nn.AdaptiveLogSoftmaxWithLoss, c: int) -> tuple[int, int]:
    """(cluster, row) of class c: cluster 0 = head shortlist, i >= 1 = tail[i - 1]."""
    cutoffs = asm.cutoffs
    if c < cutoffs[0]:
        return 0, c
    for i in range(1, len(cutoffs)):
        if c < cutoffs[i]:
            return i, c - cutoffs[i - 1]
    raise ValueError(f"class {c} outside the adaptive softmax ({asm.n_classes} classes)")


def _weight(asm: nn.AdaptiveLogSoftmaxWithLoss, cluster: int) -> nn.Parameter:
    return asm.head.weight if cluster == 0 else asm.tail[cluster - 1][1].weight  # type: ignore[index,return-value]


def resort_by_frequency(
    asm: nn.AdaptiveLogSoftmaxWithLoss, opt: torch.optim.Optimizer, cat: Catalog
) -> int:
    """Re-assign classes so that class order = frequency order; returns items moved."""
    live = np.array(sorted(cat.index.values()), dtype=np.int64)
    has = live[cat.asm_class[live] >= 0]
    if len(has) == 0:
        return 0
    # Most frequent first; ties keep the current order (stable, deterministic).
    order = has[np.lexsort((cat.asm_class[has], -cat.count[has]))]
    new_class = np.arange(len(order), dtype=np.int64)
    old_class = cat.asm_class[order].copy()
    if np.array_equal(old_class, new_class):
        return 0
    moves: dict[int, list[tuple[int, int]]] = {}
    restarts: dict[int, list[int]] = {}
    for o, n in zip(old_class.tolist(), new_class.tolist(), strict=True):
        co, ro = _locate(asm, o)
        cn, rn = _locate(asm, n)
        if co == cn:
            moves.setdefault(co, []).append((ro, rn))
        else:
            restarts.setdefault(cn, []).append(rn)
    with torch.no_grad():
        for cluster in sorted(set(moves) | set(restarts)):
            w = _weight(asm, cluster)
            state: dict[str, Any] = opt.state.get(w, {})
            tensors = [w.data] + [
                v for v in state.values() if torch.is_tensor(v) and v.shape == w.shape
            ]
            pairs = moves.get(cluster, [])
            src = torch.tensor([p[0] for p in pairs], dtype=torch.long, device=w.device)
            dst = torch.tensor([p[1] for p in pairs], dtype=torch.long, device=w.device)
            fresh = torch.tensor(restarts.get(cluster, []), dtype=torch.long, device=w.device)
            for t in tensors:
                moved = t[src].clone()
                t[dst] = moved
                t[fresh] = 0.0  # moved in from another cluster: a neutral new output row
    cat.asm_class[order] = new_class
    return int((old_class != new_class).sum())
