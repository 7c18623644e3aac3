"""The two-tower recommender: dense towers (this module) + sparse id rows (ItemTable).

Shapes: B batch, H history length, D embedding dim, N candidate items.

- Item tower: ``(id_rows [N, D], text [N, T], cats [N, C]) -> [N, D]``: the learned id
  embedding (zero for ids below the admission threshold) + a trainable projection of the
  frozen language-model text embedding + the mean of hashed category embeddings. A new
  item with text but no interactions is placed by its text alone.
- User tower: recency-aware attention pooling over the history's item vectors plus the
  most recent item, then an MLP with a residual. No per-user parameters: a brand-new
  user works from the first event, and an empty history maps to a learned cold vector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


class ItemTower(nn.Module):
    """id rows [N, D] + text [N, T] + category buckets [N, C] (0 = none) -> item vectors [N, D]."""

    def __init__(self, cfg: ModelConfig, text_dim: int) -> None:
        super().__init__()
        self.dim = cfg.dim
        self.text_dim = text_dim
        self.text_proj = nn.Linear(text_dim, cfg.dim, bias=False) if text_dim > 0 else None
        if self.text_proj is not None:
            nn.init.normal_(self.text_proj.weight, std=cfg.init_std)
        self.category = (
            nn.Embedding(cfg.category_buckets + 1, cfg.dim, padding_idx=0)
            if cfg.category_buckets > 0
            else None
        )
        if self.category is not None:
            nn.init.normal_(self.category.weight, std=cfg.init_std)
            with torch.no_grad():
                self.category.weight[0].zero_()

    def forward(
        self,
        id_rows: torch.Tensor,
        text: torch.Tensor | None = None,
        cats: torch.Tensor | None = None,
    ) -> torch.Tensor:
        out = id_rows
        if self.text_proj is not None and text is not None:
            out = out + self.text_proj(text)
        if self.category is not None and cats is not None:
            # Mean of the item's category embeddings: one embedding_bag (padding bucket 0
            # left out) instead of gathering [N, C, D] and masking it, ~5x cheaper on a
            # whole catalogue; the same sums.
            flat = cats.reshape(-1, cats.shape[-1])  # [N, C]
            summed = F.embedding_bag(flat, self.category.weight, mode="sum", padding_idx=0)
            n = (flat > 0).sum(dim=1, keepdim=True).clamp(min=1).to(id_rows.dtype)  # [N, 1]
            out = out + (summed / n).reshape(*cats.shape[:-1], self.dim)
        return out


class UserTower(nn.Module):
    """history item vectors [B, H, D] + mask [B, H] (newest first) -> user vector [B, D]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.dim, cfg.history_length
        self.position = nn.Parameter(torch.zeros(h, d))
        self.attn = nn.Linear(d, d)
        self.query = nn.Parameter(torch.zeros(d))
        self.dropout = nn.Dropout(cfg.dropout)
        self.mlp1 = nn.Linear(2 * d, cfg.hidden)
        self.mlp2 = nn.Linear(cfg.hidden, d)
        self.cold = nn.Parameter(torch.zeros(d))
        nn.init.normal_(self.position, std=0.02)
        nn.init.normal_(self.query, std=0.1)
        nn.init.zeros_(self.mlp2.weight)
        nn.init.zeros_(self.mlp2.bias)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        maskf = mask.to(hist.dtype)  # [B, H]
        x = hist + self.position.unsqueeze(0)  # [B, H, D]
        logits = torch.tanh(self.attn(x)) @ self.query  # [B, H]
        logits = logits.masked_fill(maskf == 0, -1e9)
        weights = torch.softmax(logits, dim=1) * maskf  # [B, H]
        pooled = (weights.unsqueeze(-1) * hist).sum(dim=1)  # [B, D]
        newest = hist[:, 0, :]  # [B, D] (zero row when empty)
        hidden = self.dropout(torch.relu(self.mlp1(torch.cat([pooled, newest], dim=1))))
        user = pooled + newest + self.mlp2(hidden)  # [B, D]
        has_any = (maskf.sum(dim=1, keepdim=True) > 0).to(hist.dtype)  # [B, 1]
        out: torch.Tensor = has_any * user + (1.0 - has_any) * self.cold.unsqueeze(0)
        return out


class SequenceTower(nn.Module):
    """history item vectors [B, H, D] + mask [B, H] (newest first) -> user vector [B, D].

    Sequence-aware user tower: the newest item queries the history (one attention head over
    the position-tagged items: what the last item says about which past items matter), the
    ``transition_items`` newest items each go through a learned D x D transition map (an
    item-to-item "what comes next" term, FPMC-like), and an MLP with a residual mixes them.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.dim, cfg.history_length
        self.dim = d
        self.n_trans = max(1, min(cfg.transition_items, h))
        self.position = nn.Parameter(torch.zeros(h, d))
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.transition = nn.Parameter(torch.zeros(self.n_trans, d, d))
        self.dropout = nn.Dropout(cfg.dropout)
        self.mlp1 = nn.Linear(3 * d, cfg.hidden)
        self.mlp2 = nn.Linear(cfg.hidden, d)
        self.cold = nn.Parameter(torch.zeros(d))
        nn.init.normal_(self.position, std=0.02)
        nn.init.zeros_(self.mlp2.weight)
        nn.init.zeros_(self.mlp2.bias)

    def forward(self, hist: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        maskf = mask.to(hist.dtype)  # [B, H]
        x = hist + self.position.unsqueeze(0)  # [B, H, D]
        newest = hist[:, 0, :]  # [B, D] (zero row when empty)
        q = self.q(x[:, 0, :])  # [B, D]
        logits = (self.k(x) @ q.unsqueeze(-1)).squeeze(-1) / float(self.dim) ** 0.5  # [B, H]
        logits = logits.masked_fill(maskf == 0, -1e9)
        weights = torch.softmax(logits, dim=1) * maskf  # [B, H]
        context = (weights.unsqueeze(-1) * self.v(x)).sum(dim=1)  # [B, D]
        t = self.n_trans
        recent = hist[:, :t, :] * maskf[:, :t].unsqueeze(-1)  # [B, t, D]
        trans = torch.einsum("btd,tde->be", recent, self.transition)  # [B, D]
        hidden = self.dropout(torch.relu(self.mlp1(torch.cat([context, newest, trans], dim=1))))
        user = newest + context + trans + self.mlp2(hidden)  # [B, D]
        has_any = (maskf.sum(dim=1, keepdim=True) > 0).to(hist.dtype)  # [B, 1]
        out: torch.Tensor = has_any * user + (1.0 - has_any) * self.cold.unsqueeze(0)
        return out


USER_TOWERS = ("attention", "sequence")


class TwoTower(nn.Module):
    """Dense part of the model; the item id rows are passed in (they live in sparse state)."""

    def __init__(self, cfg: ModelConfig, text_dim: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_dim = text_dim
        self.item_tower = ItemTower(cfg, text_dim)
        if cfg.user_tower not in USER_TOWERS:
            raise ValueError(
                f"model.user_tower must be one of {', '.join(USER_TOWERS)}; got {cfg.user_tower!r}"
            )
        self.user_tower: UserTower | SequenceTower = (
            SequenceTower(cfg) if cfg.user_tower == "sequence" else UserTower(cfg)
        )
        # Weights of the transition memory per history position (newest first).
        self.transition_weight: nn.Parameter | None = None
        # With the memory on, the final score blends the dot product, the transition scores
        # and, for items never interacted with, an imputed transition score, with learned
        # weights ``blend_weight`` = [dot-product scale a, imputation weight g]
        # (see :func:`blend_scores`).
        self.blend_weight: nn.Parameter | None = None
        if cfg.transition_slots > 0:
            p = max(1, min(cfg.transition_window, cfg.history_length))
            self.transition_weight = nn.Parameter(torch.tensor([1.0 / (i + 1) for i in range(p)]))
            self.blend_weight = nn.Parameter(torch.tensor([1.0, 1.0]))

    def user_vectors(self, hist_items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist_items [B, H, D] item vectors of the history, newest first; mask [B, H] -> [B, D]."""
        out: torch.Tensor = self.user_tower(hist_items, mask)
        return out


def transition_scores(
    weight: torch.Tensor,
    succ_idx: torch.Tensor,
    succ_cnt: torch.Tensor,
    history_ids: torch.Tensor,
    mask: torch.Tensor,
    n_items: int,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """Transition-memory scores [B, n_items]: sum over the P newest history items h_p of
    ``weight[p] * log(1 + count(h_p -> j))`` for each remembered successor j of h_p.

    succ_idx [N, M] int64 successor indices (0 = empty slot), succ_cnt [N, M] their counts,
    history_ids [B, H] indices (newest first, 0 = padding), mask [B, H], weight [P].
    ``zeros`` [B, n_items]: zeros to add the scores to (an exported graph derives them
    from a tensor's shape, so that it does not hold n_items as a constant).
    """
    hist = history_ids[:, : weight.shape[0]]  # [B, P]
    return history_transition_scores(weight, succ_idx[hist], succ_cnt[hist], mask, n_items, zeros)


def history_transition_scores(
    weight: torch.Tensor,
    hist_idx: torch.Tensor,
    hist_cnt: torch.Tensor,
    mask: torch.Tensor,
    n_items: int,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`transition_scores` from the memories of the P newest history items only:
    hist_idx [B, P, M] successor indices, hist_cnt [B, P, M] counts, mask [B, H],
    weight [P] -> [B, n_items] (the trainer gathers those B x P rows instead of the
    whole catalogue's)."""
    p = weight.shape[0]
    w = torch.log1p(hist_cnt) * (
        weight.view(1, p, 1) * mask[:, :p].to(weight.dtype).unsqueeze(-1)
    )  # [B, P, M]
    b = hist_idx.shape[0]
    if zeros is None:  # (a fresh tensor: added to in place, one [B, n_items] copy less)
        out = torch.zeros(b, n_items, dtype=w.dtype, device=w.device)
        return out.scatter_add_(1, hist_idx.reshape(b, -1), w.reshape(b, -1))
    return zeros.scatter_add(1, hist_idx.reshape(b, -1), w.reshape(b, -1))


# Content neighbours per user whose transition scores a never-interacted item borrows.
COLD_NEIGHBOURS = 10


def blend_scores(
    dense: TwoTower,
    dot: torch.Tensor,
    trans: torch.Tensor | None,
    cold: torch.Tensor | None = None,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final scores [B, N] from dot products [B, N] and transition scores [B, N].

    Without memory: ``dot``. With it: ``a * dot + trans + g * cold * reaches * imputed``
    where ``cold`` [N] is 1 for items never interacted with (no transition evidence can
    exist for them: a zero count is no evidence against them), ``imputed`` [B, 1] is the
    mean transition score of the user's COLD_NEIGHBOURS best items by dot product among
    the other, non-``excluded`` ([B, N] bool: history, padding, holes) items, and
    ``reaches`` [B, N] is 1 where the dot product is at least the last of those items'.
    So a catalogue-only item that matches the user's taste as well as those items
    competes as if it had their typical transition evidence; g (learned from the stream's
    first interactions with items) says how much that benefit of the doubt is worth.
    """
    if trans is None:
        return dot
    w = dense.blend_weight
    if w is None:
        return dot + trans
    out = w[0] * dot + trans
    if cold is not None and excluded is not None:
        k = min(COLD_NEIGHBOURS, dot.shape[1])
        warm_dot = dot.masked_fill(excluded | (cold > 0).unsqueeze(0), -1e9)
        top = torch.topk(warm_dot, k, dim=1)
        valid = (top.values > -1e8).to(dot.dtype)  # [B, k]: fewer warm items than k
        borrowed = (trans.gather(1, top.indices) * valid).sum(dim=1, keepdim=True)
        imputed = borrowed / valid.sum(dim=1, keepdim=True).clamp(min=1.0)  # [B, 1]
        # Only a cold item whose dot product reaches the k-th best warm item's borrows:
        # one that matches the user's taste as well as the items it borrows from. Were
        # every cold item given the same benefit of the doubt, a catalogue with many of
        # them (a long tail, new arrivals) would fill the top of every list with them.
        reaches = (dot >= top.values[:, -1:]).to(dot.dtype)  # [B, N]
        out = out + w[1] * imputed * (cold.unsqueeze(0) * reaches)
    return out


def excluded_items(
    scores: torch.Tensor, history_ids: torch.Tensor, exclude_ids: torch.Tensor
) -> torch.Tensor:
    """[B, V + 1] float, 1 where an exported graph must not recommend: padding (index 0)
    and every index of history_ids [B, H] and exclude_ids [B, E]."""
    seen = torch.zeros_like(scores).scatter(1, history_ids, 1.0)
    seen = seen.scatter(1, exclude_ids, 1.0)
    seen[:, 0] = 1.0
    return seen


class TopKModel(nn.Module):
    """What is exported to ONNX: history (indices into the exported item matrix) -> top-k.

    Inputs: history_ids int64 [B, H] (0 = padding), history_mask bool/int [B, H], and
    exclude_ids int64 [B, E] (E any, 0 = padding): further items never recommended, e.g.
    the user's known history beyond the last H, or what the caller has already shown.
    The item matrix holds final item vectors (the item tower is applied before export).
    Outputs: top_ids int64 [B, K] (indices; the version's item list maps them to ids),
    top_scores float32 [B, K]. Padding and the items of history_ids and exclude_ids are
    excluded (they also do not count among the user's best-matching warm items that a
    cold item borrows its transition evidence from, as in training).
    """

    input_names = ("history_ids", "history_mask", "exclude_ids")

    def __init__(
        self,
        dense: TwoTower,
        item_vectors: torch.Tensor,
        k: int,
        successors: tuple[torch.Tensor, torch.Tensor] | None = None,
        cold: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.dense = dense
        # [V + 1, D] final item vectors (item tower applied), row 0 = padding (zeros)
        self.register_buffer("item_rows", item_vectors)
        self.k = min(k, item_vectors.shape[0] - 1)
        # Transition memory: [V + 1, M] successor indices (0 = none) and their counts.
        self.transitions = successors is not None and dense.transition_weight is not None
        if successors is not None:
            self.register_buffer("succ_idx", successors[0])
            self.register_buffer("succ_cnt", successors[1])
        # [V + 1] float: 1 for items never interacted with (blend_scores), row 0 = padding.
        self.has_cold = cold is not None and self.transitions
        if cold is not None:
            self.register_buffer("cold", cold)

    def forward(
        self, history_ids: torch.Tensor, history_mask: torch.Tensor, exclude_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.item_rows
        assert isinstance(rows, torch.Tensor)
        hist = rows[history_ids]  # [B, H, D]
        user = self.dense.user_vectors(hist, history_mask.to(torch.float32))  # [B, D]
        scores = user @ rows.t()  # [B, V + 1]
        trans: torch.Tensor | None = None
        if self.transitions:
            weight = self.dense.transition_weight
            succ_idx, succ_cnt = self.succ_idx, self.succ_cnt
            assert isinstance(weight, torch.Tensor) and isinstance(succ_idx, torch.Tensor)
            assert isinstance(succ_cnt, torch.Tensor)
            trans = transition_scores(
                weight,
                succ_idx,
                succ_cnt,
                history_ids,
                history_mask,
                rows.shape[0],
                torch.zeros_like(scores),  # (the graph takes V from the scores' shape)
            )
        seen = excluded_items(scores, history_ids, exclude_ids)
        cold: torch.Tensor | None = None
        if self.has_cold:
            buf = self.cold
            assert isinstance(buf, torch.Tensor)
            cold = buf
        scores = blend_scores(self.dense, scores, trans, cold, seen > 0)
        scores = scores - seen * 1e9
        top_scores, top_ids = torch.topk(scores, self.k, dim=1)
        return top_ids, top_scores
