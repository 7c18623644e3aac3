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
            present = (cats > 0).to(id_rows.dtype).unsqueeze(-1)  # [N, C, 1]
            summed = (self.category(cats) * present).sum(dim=-2)
            out = out + summed / present.sum(dim=-2).clamp(min=1.0)
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


class TwoTower(nn.Module):
    """Dense part of the model; the item id rows are passed in (they live in sparse state)."""

    def __init__(self, cfg: ModelConfig, text_dim: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_dim = text_dim
        self.item_tower = ItemTower(cfg, text_dim)
        self.user_tower = UserTower(cfg)

    def user_vectors(self, hist_items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist_items [B, H, D] item vectors of the history, newest first; mask [B, H] -> [B, D]."""
        out: torch.Tensor = self.user_tower(hist_items, mask)
        return out


class TopKModel(nn.Module):
    """What is exported to ONNX: history (indices into the exported item matrix) -> top-k.

    Inputs: history_ids int64 [B, H] (0 = padding), history_mask bool/int [B, H].
    The item matrix holds final item vectors (the item tower is applied before export).
    Outputs: top_ids int64 [B, K] (indices; the version's item list maps them to ids),
    top_scores float32 [B, K]. Padding and items already in the history are excluded.
    """

    def __init__(self, dense: TwoTower, item_vectors: torch.Tensor, k: int) -> None:
        super().__init__()
        self.dense = dense
        # [V + 1, D] final item vectors (item tower applied), row 0 = padding (zeros)
        self.register_buffer("item_rows", item_vectors)
        self.k = min(k, item_vectors.shape[0] - 1)

    def forward(
        self, history_ids: torch.Tensor, history_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.item_rows
        assert isinstance(rows, torch.Tensor)
        hist = rows[history_ids]  # [B, H, D]
        user = self.dense.user_vectors(hist, history_mask.to(torch.float32))  # [B, D]
        scores = user @ rows.t()  # [B, V + 1]
        seen = torch.zeros_like(scores).scatter(1, history_ids, 1.0)
        seen[:, 0] = 1.0
        scores = scores - seen * 1e9
        top_scores, top_ids = torch.topk(scores, self.k, dim=1)
        return top_ids, top_scores
