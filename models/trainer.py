"""The online learner: micro-batch gradient steps on the two-tower model.

State split (matches the Flink state layout, see DESIGN.md "State rules"):
- ``dense blob``: dense tower parameters + their optimizer state, one versioned blob;
- ``rows``: one packed row per item id (embedding + optimizer slots + count + last seen),
  only touched rows are returned after a step;
- ``meta``: counters (step, version, events seen, ...) as a small dict.

:class:`OnlineLearner` is a *cache* of that state. ``ensure_loaded`` rebuilds it when the
state's step counter differs from the cache's (after a restore, or on another worker).
Randomness (row init, negative sampling) is seeded from ``(seed, step)`` in state, never
from the wall clock, so the same input gives the same model.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models.config import ModelConfig, TrainerConfig
from models.device import pick_device
from models.history import Sample
from models.item_table import ItemTable, stable_seed
from models.two_tower import TwoTower

DENSE_FORMAT = 1
META_FORMAT = 1
ADAGRAD_EPS = 1e-10
ADAGRAD_INIT = 0.1


def optimizer_slots(optimizer: str, dim: int) -> int:
    """Per-row optimizer state width K: AdaGrad 1 (row-wise), SGD 0, Adam 2*D + 1 (m, v, t)."""
    return {"adagrad": 1, "sgd": 0, "adam": 2 * dim + 1}[optimizer]


def new_meta(model_key: str) -> dict[str, Any]:
    return {
        "format": META_FORMAT,
        "model_key": model_key,
        "step": 0,
        "version": 0,
        "events_seen": 0,
        "positives_trained": 0,
        "samples_since_export": 0,
        "last_export_step": 0,
        "hwm_ts": 0,
        "non_finite_skips": 0,
        "oov": 0,
        "loss_ema": None,
        "recall10_ema": None,
    }


@dataclass
class StepResult:
    """What one call to :meth:`OnlineLearner.learn` changed."""

    touched_rows: dict[str, bytes] = field(default_factory=dict)
    dense_blob: bytes | None = None
    loss: float | None = None
    skipped_non_finite: bool = False


class OnlineLearner:
    """Cache of one model key's trainer state with the gradient step on top."""

    def __init__(
        self, model_cfg: ModelConfig, cfg: TrainerConfig, device: torch.device | None = None
    ):
        self.model_cfg = model_cfg
        self.cfg = cfg
        self.device = device or pick_device()
        self.dim = model_cfg.dim
        self.slots = optimizer_slots(cfg.optimizer, model_cfg.dim)
        self.loaded_step: int | None = None
        self._fresh()

    # ----------------------------------------------------------------- state <-> cache
    def _fresh(self) -> None:
        # Seed the dense init from config without disturbing the process-wide RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(stable_seed(self.cfg.seed, "dense"))
            self.model = TwoTower(self.model_cfg).to(self.device)
        params = list(self.model.parameters())
        if self.cfg.optimizer == "adagrad":
            self.opt: torch.optim.Optimizer = torch.optim.Adagrad(
                params, lr=self.cfg.lr, initial_accumulator_value=ADAGRAD_INIT
            )
        elif self.cfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=self.cfg.lr)
        else:
            self.opt = torch.optim.SGD(params, lr=self.cfg.lr)
        self.table = ItemTable(
            self.dim,
            self.slots,
            self.model_cfg.max_items,
            self.model_cfg.init_std,
            self.cfg.seed,
            self.device,
        )
        if self.cfg.optimizer == "adagrad":
            self.table.data[:, self.dim] = ADAGRAD_INIT

    def dense_blob(self) -> bytes:
        buf = io.BytesIO()
        torch.save(
            {
                "format": DENSE_FORMAT,
                "optimizer": self.cfg.optimizer,
                "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                "opt": self.opt.state_dict(),
            },
            buf,
        )
        return buf.getvalue()

    def ensure_loaded(
        self,
        meta: dict[str, Any],
        dense_blob: Callable[[], bytes | None],
        rows: Callable[[], Iterable[tuple[str, bytes]]],
    ) -> None:
        """Rebuild the cache from state unless it already reflects ``meta['step']``."""
        if self.loaded_step == meta["step"]:
            return
        self._fresh()
        blob = dense_blob()
        if blob is not None:
            obj = torch.load(io.BytesIO(blob), map_location=self.device, weights_only=False)
            if obj.get("format") != DENSE_FORMAT:
                raise ValueError(
                    f"dense trainer state has format {obj.get('format')}, this release reads "
                    f"{DENSE_FORMAT}; restore from a compatible savepoint or start a new model key"
                )
            if obj.get("optimizer") != self.cfg.optimizer:
                raise ValueError(
                    f"state was trained with optimizer {obj.get('optimizer')!r} but "
                    "trainer.optimizer "
                    f"is {self.cfg.optimizer!r}; set it back or start a new model key"
                )
            self.model.load_state_dict(obj["model"])
            self.opt.load_state_dict(obj["opt"])
        self.table.load_rows(rows())
        self.loaded_step = meta["step"]

    # ----------------------------------------------------------------------- learning
    def _history_batch(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
        """history indices [B, H] newest first, 0-padded, and mask [B, H]."""
        h = self.model_cfg.history_length
        ids = np.zeros((len(samples), h), dtype=np.int64)
        for i, s in enumerate(samples):
            recent = s.history[-h:][::-1]
            for j, item in enumerate(recent):
                ids[i, j] = self.table.lookup(item, add=True)
        t = torch.from_numpy(ids).to(self.device)
        return t, (t > 0)

    def learn(self, samples: list[Sample], meta: dict[str, Any]) -> StepResult:
        """Test-then-train on one micro-batch; updates ``meta`` in place.

        Scores the batch with the current model first (prequential recall@10 and loss),
        then takes one gradient step with sampled softmax over in-batch + uniformly
        sampled negatives with logQ correction.
        """
        meta["events_seen"] += len(samples)
        meta["samples_since_export"] += len(samples)
        if samples:
            meta["hwm_ts"] = max(meta["hwm_ts"], max(s.ts for s in samples))
        pos = [s for s in samples if s.label == 1 and s.weight > 0]
        result = StepResult()
        if not pos:
            return result
        table = self.table
        first_new = len(table.ids)  # rows created by this call must reach state even on a skip
        targets_list = []
        for s in pos:
            idx = table.lookup(s.target, add=True)
            if idx == 0:
                meta["oov"] += 1
            targets_list.append(idx)
        keep = [i for i, t in enumerate(targets_list) if t > 0]
        if not keep:
            return result
        pos = [pos[i] for i in keep]
        targets = torch.tensor([targets_list[i] for i in keep], device=self.device)
        hist, mask = self._history_batch(pos)
        weights = torch.tensor([s.weight for s in pos], device=self.device)
        n_rows = len(table)

        step = meta["step"]
        gen = torch.Generator().manual_seed(stable_seed(self.cfg.seed, "neg", step))
        negs = torch.randint(1, n_rows + 1, (self.cfg.num_negatives,), generator=gen).to(
            self.device
        )
        cand = torch.unique(torch.cat([targets, negs]))  # sorted
        labels = torch.searchsorted(cand, targets)
        touched = torch.unique(torch.cat([hist[mask], cand]))  # sorted, all > 0
        d = self.dim

        # Leaf tensor over the touched rows only; position 0 of `sub_full` is the zero pad row.
        sub = table.data[touched, :d].clone().requires_grad_(True)
        sub_full = torch.cat([torch.zeros(1, d, device=self.device), sub])
        hist_pos = torch.where(mask, torch.searchsorted(touched, hist) + 1, torch.zeros_like(hist))
        cand_pos = torch.searchsorted(touched, cand) + 1

        counts = torch.from_numpy(table.count[cand.cpu().numpy()]).to(self.device, torch.float32)
        total = float(table.count[1 : n_rows + 1].sum())
        log_q = torch.log((counts + 1.0) / (total + n_rows))

        self.model.train()
        user = self.model.user_vectors(sub_full[hist_pos], mask.float())  # [B, D]
        items = self.model.item_tower(sub_full[cand_pos])  # [C, D]
        logits = user @ items.t() / self.cfg.temperature - log_q.unsqueeze(0)
        ce = F.cross_entropy(logits, labels, reduction="none")
        loss = (ce * weights).sum() / weights.sum()
        if self.cfg.l2 > 0:
            loss = loss + self.cfg.l2 * (sub.pow(2).sum() / len(pos))

        # Prequential score of this batch before learning from it: recall@10 over the catalogue.
        with torch.no_grad():
            all_items = self.model.item_tower(table.embeddings())
            scores = user.detach() @ all_items.t()
            scores[:, 0] = -math.inf
            k = min(10, n_rows)
            top = torch.topk(scores, k, dim=1).indices
            hits = (top == targets.unsqueeze(1)).any(dim=1).float().mean().item()

        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        all_grads = [*grads, sub.grad] if sub.grad is not None else grads
        finite = math.isfinite(loss.item()) and all(
            bool(torch.isfinite(g).all()) for g in all_grads
        )
        if not finite:
            meta["non_finite_skips"] += 1
            result.skipped_non_finite = True
            result.touched_rows = {
                table.ids[i]: table.pack_row(i) for i in range(first_new, len(table.ids))
            }
            self.opt.zero_grad(set_to_none=True)
            meta["step"] += 1
            self.loaded_step = meta["step"]
            return result
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([*self.model.parameters(), sub], self.cfg.grad_clip)
        self.opt.step()
        assert sub.grad is not None
        self._sparse_update(touched, sub.grad)

        np_targets = targets.cpu().numpy()
        np.add.at(table.count, np_targets, 1)
        for s, t in zip(pos, np_targets, strict=True):
            table.last_seen[t] = max(int(table.last_seen[t]), s.ts)

        meta["step"] += 1
        meta["positives_trained"] += len(pos)
        lv = float(loss.item())
        meta["loss_ema"] = lv if meta["loss_ema"] is None else 0.98 * meta["loss_ema"] + 0.02 * lv
        meta["recall10_ema"] = (
            hits if meta["recall10_ema"] is None else 0.98 * meta["recall10_ema"] + 0.02 * hits
        )
        self.loaded_step = meta["step"]
        result.loss = lv
        result.touched_rows = {table.ids[i]: table.pack_row(i) for i in touched.tolist()}
        result.dense_blob = self.dense_blob()
        return result

    def _sparse_update(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Apply the configured optimizer to the touched id rows only ([R, D] grads)."""
        d, lr, data = self.dim, self.cfg.lr, self.table.data
        with torch.no_grad():
            if self.cfg.optimizer == "adagrad":
                acc = data[rows, d] + grad.pow(2).mean(dim=1)  # row-wise accumulator
                data[rows, d] = acc
                data[rows, :d] -= lr * grad / (acc.sqrt().unsqueeze(1) + ADAGRAD_EPS)
            elif self.cfg.optimizer == "sgd":
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

    def export_due(self, meta: dict[str, Any], now: float | None = None) -> bool:
        """Publish every ``export_every_steps`` steps, or after ``export_every_seconds``
        of processing time with unpublished progress (not in deterministic mode)."""
        if meta["step"] == meta["last_export_step"]:
            return False
        if meta["step"] - meta["last_export_step"] >= self.cfg.export_every_steps:
            return True
        if self.cfg.deterministic:
            return False
        last = float(meta.get("last_export_wall", 0.0))
        elapsed = (now if now is not None else time.time()) - last
        return elapsed >= self.cfg.export_every_seconds
