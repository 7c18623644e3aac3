"""The co-occurrence (transition) memory: each id row's strongest neighbours and counts.

Layout, after an id row's embedding and optimizer slots (``offset`` columns): M neighbour
catalogue indices (stored as float32, 0 = empty slot), their M float32 counts and, with
forgetting on, the row's count epoch. The memory lives in the item table, so it is
checkpointed, restored and exported with the rows; this module holds everything that
reads or writes it.

Counting: each positive with target t and history h_0 (newest) ... adds
``transition_decay ** d`` to t's count in h_d's row for its ``transition_pairs`` newest
history items, and with ``transition_symmetric`` h_d's in t's row (:meth:`remember`).
Forgetting: every count weighs half after ``transition_half_life`` learned positives
(:meth:`fade`).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import torch

from models.config import ModelConfig

# Exponent span of one count epoch (see CoOccurrenceMemory.fade): counts added within an
# epoch differ in scale by less than 2^FADE_SPAN, far inside float32's range.
FADE_SPAN = 16


def count_all(
    block: npt.NDArray[np.float32],
    at: npt.NDArray[np.int64],
    j: npt.NDArray[np.int64],
    w: npt.NDArray[np.float64],
) -> None:
    """Add one step's counts to the transition memories ``block`` [R, 2M] (per row: M
    neighbour catalogue indices, then their M float32 counts), in place: count c adds
    ``w[c]`` to neighbour ``j[c] > 0`` of row ``at[c]``.

    A step's counts are summed per (row, neighbour) first, so their order does not
    matter. A neighbour the row holds adds its sum to its count; the new ones then keep
    the strongest M of the row's old and new neighbours: the strongest new one takes
    the row's weakest slot if it counts more (an empty slot counts less than anything),
    the second strongest the second weakest, and so on (ties keep the old neighbour and
    the first slot; equal new sums go in catalogue order). A full row thus admits a new
    neighbour only with more evidence than its weakest one; forgetting
    (``model.transition_half_life``) keeps lowering that bar.

    All in whole-array numpy operations (no Python loop per count or per row): a step of
    B samples counts up to ``2 * B * transition_pairs`` pairs."""
    if not len(at):
        return
    m = block.shape[1] // 2
    idx, cnt = block[:, :m], block[:, m:]  # views: written in place
    span = int(j.max()) + 1
    keys, inv = np.unique(at.astype(np.int64) * span + j, return_inverse=True)
    sums = np.bincount(inv, weights=w.astype(np.float32).astype(np.float64))  # [P]
    rows, nbrs = keys // span, (keys % span).astype(np.float32)
    hit = idx[rows] == nbrs[:, None]  # [P, M]: catalogue indices < 2^24 are exact
    held = hit.any(axis=1)
    hr, hk = rows[held], hit[held].argmax(axis=1)
    cnt[hr, hk] = (cnt[hr, hk].astype(np.float64) + sums[held]).astype(np.float32)
    new = ~held
    if not new.any():
        return
    nr, nj, nw = rows[new], nbrs[new], sums[new].astype(np.float32)
    order = np.lexsort((nj, -nw, nr))  # per row, strongest first
    nr, nj, nw = nr[order], nj[order], nw[order]
    urows, first = np.unique(nr, return_index=True)
    at_row = np.searchsorted(urows, nr)
    rank = np.arange(len(nr)) - first[at_row]  # q: the q-th strongest new of its row
    strength = np.where(idx[urows] == 0, -np.inf, cnt[urows])  # [U, M]
    weakest = np.argsort(strength, axis=1, kind="stable")  # the q-th weakest slot
    fits = rank < m
    at_row, rank, nr, nj, nw = at_row[fits], rank[fits], nr[fits], nj[fits], nw[fits]
    slot = weakest[at_row, rank]
    take = nw > strength[at_row, slot]
    idx[nr[take], slot[take]] = nj[take]
    cnt[nr[take], slot[take]] = nw[take]


class CoOccurrenceMemory:
    """Reads and writes the memory columns of an item table's rows (see the module doc).

    ``slots`` M (0 = off), ``offset``: the first memory column of a row. The clock of
    forgetting is the number of learned positives, passed in by the caller (it is meta
    state, restored with the model)."""

    def __init__(self, cfg: ModelConfig, slots: int, offset: int):
        self.m = slots
        self.off = offset
        self.half_life = cfg.transition_half_life if slots else 0
        self.width = 2 * slots + (1 if self.half_life > 0 else 0)
        self.pairs = max(1, cfg.transition_pairs)
        self.decay = cfg.transition_decay
        self.symmetric = cfg.transition_symmetric

    def read(
        self, data: torch.Tensor, rows: torch.Tensor, positives: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory of id rows ``rows`` (any shape S) of table ``data``: neighbour
        catalogue indices [*S, M] (as float32) and their counts [*S, M] as of clock
        ``positives`` (faded)."""
        m = self.m
        block = data[rows, self.off : self.off + self.width]
        cnt = block[..., m : 2 * m]
        if self.half_life:
            # A row's counts are stored relative to its epoch k: the true count is
            # stored * 2^-(E - FADE_SPAN * k) with E = positives / half_life.
            e = positives / self.half_life
            cnt = cnt * torch.exp2(block[..., 2 * m :] * FADE_SPAN - e)
        return block[..., :m], cnt

    def strongest(self, data: torch.Tensor, rows: torch.Tensor, k: int) -> torch.Tensor:
        """The distinct catalogue indices among the ``k`` most counted neighbours of each
        of ``rows`` [R] (empty slots left out), sorted."""
        m = self.m
        block = data[rows, self.off : self.off + 2 * m]
        top = torch.topk(block[:, m:], min(k, m), dim=1)
        out: torch.Tensor = torch.unique(block[:, :m].gather(1, top.indices).long()[top.values > 0])
        return out

    def remember(
        self,
        data: torch.Tensor,
        row_of: npt.NDArray[np.int64],
        hist: torch.Tensor,
        targets: npt.NDArray[np.int64],
        positives: int,
    ) -> npt.NDArray[np.int64]:
        """Count one step's positives into ``data`` in place and return the id rows written.

        hist [B, H]: the positives' histories (catalogue indices, newest first, 0 =
        padding), targets [B] their catalogue indices, ``row_of`` catalogue index -> id
        row (0 = none: such an item's pairs are not counted in its row). History items
        older than the newest ``transition_pairs`` (at most H) are not counted."""
        pairs = min(self.pairs, hist.shape[1])
        h = hist[:, :pairs].cpu().numpy()  # [B, P]: h[:, d] is the d-th newest item
        t = np.broadcast_to(targets[:, None], h.shape)  # [B, P]
        w = np.broadcast_to(self.decay ** np.arange(pairs), h.shape)
        valid = (h > 0) & (h != t)
        # (id row, neighbour, weight) per count.
        if self.symmetric:
            rows_of = np.stack([row_of[h], row_of[t]], axis=2)  # [B, P, 2]
            nbrs = np.stack([t, h], axis=2)
            w, valid = np.stack([w, w], axis=2), np.stack([valid, valid], axis=2)
        else:
            rows_of, nbrs = row_of[h], t
        keep = valid & (rows_of > 0)  # row 0 = no id row: not counted
        r_all, j_all, w_all = rows_of[keep], nbrs[keep], w[keep]
        if not len(r_all):
            return np.zeros(0, dtype=np.int64)
        # On a host copy of the touched rows' memory: one transfer each way.
        rows, at = np.unique(r_all, return_inverse=True)
        off, end = self.off, self.off + self.width
        rows_t = torch.from_numpy(rows.astype(np.int64)).to(data.device)
        block = data[rows_t, off:end].cpu().numpy()  # [R, 2M (+1)] (a copy)
        if self.half_life:
            w_all = w_all * self.fade(block, positives)
        count_all(block[:, : 2 * self.m], at, j_all, w_all)
        with torch.no_grad():
            data[rows_t, off:end] = torch.from_numpy(block).to(data.device)
        written: npt.NDArray[np.int64] = rows.astype(np.int64)
        return written

    def fade(self, block: npt.NDArray[np.float32], positives: int) -> float:
        """Bring the memories ``block`` [R, 2M + 1] (host copy) to the count epoch of clock
        ``positives`` and return the factor a count added now is stored with.

        Forgetting multiplies every count by 2^(-1 / half_life) per learned positive. Doing
        that to every row per step would write the whole table; instead a count added at
        clock E = positives / half_life is stored times 2^(E - FADE_SPAN * k), k =
        floor(E / FADE_SPAN) the epoch, which each row keeps in its last slot. Within an
        epoch stored counts compare as the true ones do (the weakest slot is the same) and
        no factor exceeds 2^FADE_SPAN; a row written in a later epoch is first rescaled to
        it (ancient counts underflow to 0, freeing their slots)."""
        m = self.m
        e = positives / self.half_life
        k = math.floor(e / FADE_SPAN)
        behind = block[:, 2 * m] < k
        if behind.any():
            lag = (k - block[behind, 2 * m].astype(np.float64)) * FADE_SPAN
            block[behind, m : 2 * m] *= np.exp2(-lag)[:, None].astype(np.float32)
            block[behind, 2 * m] = k
        return float(2.0 ** (e - FADE_SPAN * k))
