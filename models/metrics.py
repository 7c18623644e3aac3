"""Prequential (test-then-train) metrics: one implementation for the stream and `rtrec eval`.

Before the learner takes a gradient step on a batch, :func:`prequential_step` ranks each
positive sample's target among the whole known catalogue (minus the user's history) with
the current weights - one [P, D] x [D, N] matmul for P positives and N items - then
learns from the batch. The ranks give Recall@K, NDCG@K and MRR; the batch's loss before
the step is the prequential loss. The aggregates live in the trainer's meta state
(``meta["prequential"]``): cumulative sums since the model key started and exponential
moving averages over recent batches, plus the Page-Hinkley drift detector's state
(``meta["drift"]``). Everything is computed from model state and integer ranks in a
fixed order, so in deterministic mode the metrics are deterministic too.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.config import TrainerConfig
from models.device import deterministic_kernels
from models.drift import PageHinkley, moving_average
from models.history import Sample
from models.trainer import OnlineLearner, StepResult

PREQUENTIAL_FORMAT = 1
# Weight of the newest batch in the moving averages (~ the last 50 batches).


def positives(samples: Iterable[Sample]) -> list[Sample]:
    """The samples that are ranked and learned as positives (label 1, weight > 0)."""
    return [s for s in samples if s.label == 1 and s.weight > 0]


@dataclass
class RankSums:
    """Sums of ranking metrics over a stretch of the stream (ranks are 1-based)."""

    n: int = 0
    hits: int = 0
    ndcg: float = 0.0
    rr: float = 0.0

    def add(self, rank: int, k: int) -> None:
        self.n += 1
        if rank <= k:
            self.hits += 1
            self.ndcg += 1.0 / math.log2(rank + 1)
        self.rr += 1.0 / rank

    def merge(self, other: RankSums) -> None:
        self.n += other.n
        self.hits += other.hits
        self.ndcg += other.ndcg
        self.rr += other.rr

    def as_dict(self, k: int) -> dict[str, Any]:
        """``{"n", "hits", "recall@k", "ndcg@k", "mrr"}`` (means over ``n``; 0 when empty)."""
        n = max(self.n, 1)
        return {
            "n": self.n,
            "hits": self.hits,
            f"recall@{k}": self.hits / n,
            f"ndcg@{k}": self.ndcg / n,
            "mrr": self.rr / n,
        }


def rank_sums(ranks: Iterable[int], k: int) -> RankSums:
    out = RankSums()
    for r in ranks:
        out.add(r, k)
    return out


@dataclass
class BatchMetrics:
    """One test-then-train step: the ranks of its positives (in order) and what they give."""

    ranks: list[int]
    sums: RankSums
    loss: float | None
    drift_detected: bool = False
    result: StepResult = field(default_factory=StepResult)


def new_prequential(k: int) -> dict[str, Any]:
    """The meta-state entry of the aggregates (plain numbers only: pickles and JSON-dumps)."""
    return {
        "format": PREQUENTIAL_FORMAT,
        "k": k,
        "batches": 0,
        "n": 0,
        "hits": 0,
        "ndcg_sum": 0.0,
        "rr_sum": 0.0,
        "loss_sum": 0.0,
        "loss_batches": 0,
        "ema": {"recall": None, "ndcg": None, "mrr": None, "loss": None},
        "drift_detections": 0,
        "last_drift_step": None,
        "last_drift_ts": None,
        "boost_steps_left": 0,
    }


def _prequential(meta: dict[str, Any], k: int) -> dict[str, Any]:
    p: dict[str, Any] | None = meta.get("prequential")
    if p is None:
        p = meta["prequential"] = new_prequential(k)
    if p.get("format") != PREQUENTIAL_FORMAT:
        raise ValueError(
            f"prequential metrics state has format {p.get('format')}, this release reads "
            f"{PREQUENTIAL_FORMAT}; restore from a compatible savepoint"
        )
    if p["k"] != k:
        raise ValueError(
            f"the model key's metrics were computed at K={p['k']} but trainer.metrics_k is {k}; "
            "keep trainer.metrics_k or start a new model key"
        )
    return p


def _detector(cfg: TrainerConfig, meta: dict[str, Any]) -> PageHinkley:
    return PageHinkley.from_state(
        meta.get("drift"),
        cfg.drift_delta,
        cfg.drift_threshold,
        cfg.drift_min_samples,
        cfg.drift_memory,
    )


def prequential_step(
    learner: OnlineLearner, meta: dict[str, Any], samples: list[Sample]
) -> BatchMetrics:
    """Rank every positive of ``samples`` with the current model, then learn from them.

    Updates ``meta`` in place: the learner's counters, ``meta["prequential"]`` (sums and
    moving averages of Recall@K / NDCG@K / MRR and the loss, K = ``trainer.metrics_k``),
    ``meta["recall10_ema"]`` (kept for the manifest's summary when K = 10) and
    the drift detector. When the detector fires and ``trainer.drift_lr_boost`` != 1, the
    next ``trainer.drift_boost_steps`` steps use ``lr * drift_lr_boost``. In deterministic
    mode on a GPU the step runs with deterministic kernels, as a job's firing does.
    """
    cfg = learner.cfg
    k = cfg.metrics_k
    p = _prequential(meta, k)
    boosting = p["boost_steps_left"] > 0
    learner.lr_scale = cfg.drift_lr_boost if boosting else 1.0
    # (`rtrec eval` and `rtrec pretrain` call this directly, not through a firing.)
    try:
        with deterministic_kernels(learner.device, cfg.deterministic):
            ranks, ranked = learner.rank_batch(positives(samples))  # the test: no update
            result = learner.learn(samples, meta, ranked)
    finally:
        learner.lr_scale = 1.0
    sums = rank_sums(ranks, k)
    loss = result.loss if result.loss is not None and math.isfinite(result.loss) else None
    detected = False
    if sums.n or loss is not None:
        p["batches"] += 1
        if boosting and result.loss is not None:
            p["boost_steps_left"] -= 1
    if sums.n:
        p["n"] += sums.n
        p["hits"] += sums.hits
        p["ndcg_sum"] += sums.ndcg
        p["rr_sum"] += sums.rr
        ema = p["ema"]
        ema["recall"] = moving_average(ema["recall"], sums.hits / sums.n)
        ema["ndcg"] = moving_average(ema["ndcg"], sums.ndcg / sums.n)
        ema["mrr"] = moving_average(ema["mrr"], sums.rr / sums.n)
        if k == 10:
            meta["recall10_ema"] = ema["recall"]
    if loss is not None:
        p["loss_sum"] += loss
        p["loss_batches"] += 1
        p["ema"]["loss"] = moving_average(p["ema"]["loss"], loss)
        if cfg.drift_enabled:
            ph = _detector(cfg, meta)
            detected = ph.update(loss)
            meta["drift"] = ph.as_state()
            if detected:
                p["drift_detections"] += 1
                p["last_drift_step"] = meta["step"]
                p["last_drift_ts"] = meta["hwm_ts"]
                if cfg.drift_lr_boost != 1.0:
                    p["boost_steps_left"] = cfg.drift_boost_steps
    return BatchMetrics(ranks, sums, loss, detected, result)


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """Cumulative and recent (moving-average) metrics of a model key, JSON-ready.

    ``{"k", "batches", "cumulative": {"n", "hits", "recall@k", "ndcg@k", "mrr", "loss"},
    "recent": {"recall@k", "ndcg@k", "mrr", "loss"}, "drift": {...}}``; empty metrics
    are None.
    """
    p = meta.get("prequential")
    if p is None:
        return {}
    k, n = p["k"], p["n"]

    def mean(total: float, count: int) -> float | None:
        return _finite(total / count) if count else None

    ema = p["ema"]
    return {
        "k": k,
        "batches": p["batches"],
        "cumulative": {
            "n": n,
            "hits": p["hits"],
            f"recall@{k}": mean(p["hits"], n),
            f"ndcg@{k}": mean(p["ndcg_sum"], n),
            "mrr": mean(p["rr_sum"], n),
            "loss": mean(p["loss_sum"], p["loss_batches"]),
        },
        "recent": {
            f"recall@{k}": _finite(ema["recall"]),
            f"ndcg@{k}": _finite(ema["ndcg"]),
            "mrr": _finite(ema["mrr"]),
            "loss": _finite(ema["loss"]),
        },
        "drift": {
            "detections": p["drift_detections"],
            "last_step": p["last_drift_step"],
            "last_event_time_ms": p["last_drift_ts"],
            "boost_steps_left": p["boost_steps_left"],
        },
    }


def metrics_record(meta: dict[str, Any], batch: BatchMetrics) -> dict[str, Any]:
    """One record of the ``metrics`` topic: this firing's batch and the running aggregates."""
    k = meta["prequential"]["k"]
    b = batch.sums.as_dict(k)
    b["loss"] = batch.loss
    b["drift_detected"] = batch.drift_detected
    return {
        "model_key": meta["model_key"],
        "step": meta["step"],
        "events_seen": meta["events_seen"],
        "event_time_hwm_ms": meta["hwm_ts"],
        "batch": b,
        **summary(meta),
    }


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class TensorBoardLog:
    """Metrics records as TensorBoard scalars, one run directory per model key
    (``<root>/<model_key>``), x axis = the trainer's step.

    Tags: ``batch/*`` (this step's positives), ``cumulative/*``, ``recent/*`` (moving
    averages) and ``drift/detections``. Written by whoever holds the model key's state
    (one trainer subtask), so runs never interleave.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self.writers: dict[str, Any] = {}

    def write(self, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        key = record["model_key"]
        w = self.writers.get(key)
        if w is None:
            w = self.writers[key] = SummaryWriter(log_dir=str(Path(self.root) / key))
        step = int(record["step"])
        for section in ("batch", "cumulative", "recent"):
            for name, value in record.get(section, {}).items():
                if isinstance(value, bool) or not isinstance(value, int | float):
                    continue
                if section == "batch" and name in ("n", "hits"):
                    continue
                w.add_scalar(f"{section}/{name}", value, step)
        drift = record.get("drift")
        if drift:
            w.add_scalar("drift/detections", drift["detections"], step)

    def flush(self) -> None:
        for w in self.writers.values():
            w.flush()

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()
