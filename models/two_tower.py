"""The two-tower recommender: dense towers (this module) + sparse id rows (ItemTable).

Shapes: B batch, H history length, D embedding dim, N candidate items.

- Item tower: ``item_vectors(id_rows [N, D]) -> [N, D]``. Today the identity on the learned
  id embedding; the language-model text projection plugs in here (``text [N, T]``).
- User tower: recency-aware attention pooling over the history's item vectors plus the
  most recent item, then an MLP with a residual. No per-user parameters: a brand-new
  user works from the first event, and an empty history maps to a learned cold vector.
"""

from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig


class ItemTower(nn.Module):
    """Maps an item's id row (and, later, its text embedding) to its vector [N, D]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dim = cfg.dim

    def forward(self, id_rows: torch.Tensor) -> torch.Tensor:
        return id_rows


class UserTower(nn.Module):
    """history item vectors [B, H, D] + mask [B, H] (newest first) -> user vector [B, D]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, h = cfg.dim, cfg.history_length
        self.position = nn.Parameter(torch.zeros(h, d))
        self.attn = nn.Linear(d, d)
        self.query = nn.Parameter(torch.zeros(d))
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
        hidden = torch.relu(self.mlp1(torch.cat([pooled, newest], dim=1)))
        user = pooled + newest + self.mlp2(hidden)  # [B, D]
        has_any = (maskf.sum(dim=1, keepdim=True) > 0).to(hist.dtype)  # [B, 1]
        out: torch.Tensor = has_any * user + (1.0 - has_any) * self.cold.unsqueeze(0)
        return out


class TwoTower(nn.Module):
    """Dense part of the model; the item id rows are passed in (they live in sparse state)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_tower = ItemTower(cfg)
        self.user_tower = UserTower(cfg)

    def user_vectors(self, hist_rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hist_rows [B, H, D] id rows of the history, newest first; mask [B, H] -> [B, D]."""
        out: torch.Tensor = self.user_tower(self.item_tower(hist_rows), mask)
        return out


class TopKModel(nn.Module):
    """What is exported to ONNX: history (indices into the exported item matrix) -> top-k.

    Inputs: history_ids int64 [B, H] (0 = padding), history_mask bool/int [B, H].
    Outputs: top_ids int64 [B, K] (indices; the version's item list maps them to ids),
    top_scores float32 [B, K]. Padding and items already in the history are excluded.
    """

    def __init__(self, dense: TwoTower, item_rows: torch.Tensor, k: int) -> None:
        super().__init__()
        self.dense = dense
        self.register_buffer("item_rows", item_rows)  # [V + 1, D], row 0 = padding (zeros)
        self.k = min(k, item_rows.shape[0] - 1)

    def forward(
        self, history_ids: torch.Tensor, history_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.item_rows
        assert isinstance(rows, torch.Tensor)
        hist = rows[history_ids]  # [B, H, D]
        user = self.dense.user_vectors(hist, history_mask.to(torch.float32))  # [B, D]
        items = self.dense.item_tower(rows)  # [V + 1, D]
        scores = user @ items.t()  # [B, V + 1]
        seen = torch.zeros_like(scores).scatter(1, history_ids, 1.0)
        seen[:, 0] = 1.0
        scores = scores - seen * 1e9
        top_scores, top_ids = torch.topk(scores, self.k, dim=1)
        return top_ids, top_scores
