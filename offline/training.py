"""Offline training and evaluation with the job's own code (no Flink).

- :func:`pretrain`: `rtrec pretrain` - train the towers on a historical slice (optionally
  fine-tuning the top transformer layers) and write the initial state every new model
  key of the streaming job starts from (``trainer.initial_state``).
- :func:`prequential`: test-then-train over a stream - rank each sample's target with the
  current model, then learn from the batch - giving Recall@K, NDCG@K and MRR per bucket;
  :func:`online_prequential`: warm-up + prequential of a fresh learner (`rtrec tune`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flink_job.config import AppConfig
from models.events import Item
from models.history import Sample
from models.metrics import RankSums, positives, prequential_step
from models.online import save_initial_state
from models.text_encoder import TextEncoder, load_configured_encoder
from models.trainer import OnlineLearner, new_meta
from offline.stream import batches

log = logging.getLogger(__name__)


def split_stream(stream: Sequence[Item | Sample], fraction: float) -> tuple[list, list]:
    """Split at the sample that ends the first ``fraction`` of samples (items stay in order)."""
    n = sum(isinstance(x, Sample) for x in stream)
    cut, seen = int(n * fraction), 0
    for i, x in enumerate(stream):
        if isinstance(x, Sample):
            if seen == cut:
                return list(stream[:i]), list(stream[i:])
            seen += 1
    return list(stream), []


def _unfreeze_top(encoder: TextEncoder, n: int) -> list[torch.nn.Parameter]:
    """Make the top ``n`` transformer layers trainable (the rest stays frozen)."""
    for p in encoder.model.parameters():
        p.requires_grad_(False)
    layers = None
    for name, module in encoder.model.named_modules():
        if name.endswith("encoder.layer") or name == "layer":
            layers = module
    if layers is None or not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"cannot find the transformer layers of {encoder.model_dir} to unfreeze")
    params = [p for layer in layers[-n:] for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    encoder.model.train()
    return params


def pretrain(
    cfg: AppConfig,
    stream: Iterable[Item | Sample],
    out: str | Path,
    epochs: int = 1,
    unfreeze_top: int = 0,
    lm_lr: float = 2e-5,
    encoder: TextEncoder | None = None,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Train on ``stream`` and write the initial state to ``out``; returns a summary
    (``cache_dir``: where catalogue text vectors are cached across runs, None = nowhere)."""
    enc = (
        encoder
        if encoder is not None
        else load_configured_encoder(
            cfg.model, cfg.trainer.deterministic, memo_size=1_000_000, cache_dir=cache_dir
        )
    )
    data = list(stream)
    learner = OnlineLearner(cfg.model, cfg.trainer, text_dim=enc.dim if enc else 0)
    meta = new_meta(cfg.job.model_key)
    texts: dict[str, str] = {}
    lm_opt = None
    if unfreeze_top > 0:
        if enc is None:
            raise ValueError("--unfreeze-top needs a text encoder (model.text_encoder is 'none')")
        lm_opt = torch.optim.AdamW(_unfreeze_top(enc, unfreeze_top), lr=lm_lr)
        enc_ = enc

        def text_fn(flat: torch.Tensor) -> torch.Tensor:
            uniq, inv = torch.unique(flat, return_inverse=True)
            ids = [learner.catalog.ids[int(i)] for i in uniq]
            body = [texts.get(i, "") for i in ids]
            has = torch.tensor([bool(t) for t in body], device=learner.device).unsqueeze(1)
            emb = enc_.forward([t or "-" for t in body]) * has
            return emb[inv]

        learner.text_fn = text_fn
    n_batches = sum(1 for _ in batches(data, cfg.trainer.batch_size)) * epochs
    bar = tqdm(total=n_batches, desc="pretrain", unit="batch", disable=not progress)
    for _ in range(epochs):
        for items, samples in batches(data, cfg.trainer.batch_size):
            for it in items:
                texts[it.item_id] = it.full_text
            if items:
                learner.ingest_items(items, meta, enc)
            if samples:  # test-then-train, so the summary's recall10_ema is prequential
                prequential_step(learner, meta, samples)
                if lm_opt is not None:
                    lm_opt.step()
                    lm_opt.zero_grad(set_to_none=True)
            bar.update(1)
    bar.close()
    summary: dict[str, Any] = {
        "steps": meta["step"],
        "samples": meta["events_seen"],
        "items": len(learner.catalog),
        "id_rows": len(learner.table),
        "recall10_ema": meta["recall10_ema"],
        "out": str(out),
    }
    if lm_opt is not None and enc is not None:
        learner.text_fn = None
        enc.model.eval()
        enc.memo.clear()
        enc.cache = None  # (its vectors are the frozen encoder's)
        encoder_dir = Path(str(out) + ".encoder")
        enc.model.save_pretrained(str(encoder_dir))
        enc.tokenizer.save_pretrained(str(encoder_dir))
        # Re-embed the catalogue with the fine-tuned encoder the job must now use.
        learner.ingest_items(
            [Item(i, texts[i], "", (), 0) for i in learner.catalog.index if i in texts], meta, enc
        )
        summary["text_encoder"] = str(encoder_dir)
    save_initial_state(learner, meta, out)
    return summary


# Prequential sums over a stretch of the stream: the trainer's own (models/metrics.py), so
# `rtrec eval` and the streaming job turn ranks into metrics with the same code.
Bucket = RankSums


@dataclass
class PrequentialResult:
    k: int
    buckets: list[Bucket] = field(default_factory=list)

    def span(self, start: int, stop: int) -> dict[str, float]:
        b = Bucket()
        for x in self.buckets[start:stop]:
            b.merge(x)
        return b.as_dict(self.k)


def prequential(
    learner: OnlineLearner,
    stream: Sequence[Item | Sample],
    encoder: TextEncoder | None,
    k: int = 10,
    n_buckets: int = 10,
    learn: bool = True,
    model_key: str = "default",
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    desc: str = "prequential",
) -> PrequentialResult:
    """Score every positive sample before learning from its batch; metrics per bucket.

    Buckets split the stream's positive samples into ``n_buckets`` equal parts in order.
    With ``learn=False`` the model stays frozen (catalogue items are still ingested).
    """
    meta = meta if meta is not None else new_meta(model_key)
    total = sum(1 for x in stream if isinstance(x, Sample) and x.label == 1 and x.weight > 0)
    per_bucket = max(1, math.ceil(total / n_buckets))
    result = PrequentialResult(k, [Bucket() for _ in range(n_buckets)])
    seen = 0
    bar = tqdm(total=total, desc=desc, unit="ev", disable=not progress, mininterval=1.0)
    for items, samples in batches(stream, learner.cfg.batch_size):
        if items:
            learner.ingest_items(items, meta, encoder)
        if learn and samples:  # the job's test-then-train step
            ranks = prequential_step(learner, meta, samples).ranks
        else:
            ranks = learner.rank_targets(positives(samples))
        for rank in ranks:
            result.buckets[min(seen // per_bucket, n_buckets - 1)].add(rank, k)
            seen += 1
        bar.update(len(ranks))
    bar.close()
    return result


def warm_up(
    learner: OnlineLearner,
    stream: Iterable[Item | Sample],
    encoder: TextEncoder | None,
    meta: dict[str, Any],
    progress: bool = False,
    desc: str = "warm-up",
) -> None:
    """Learn from ``stream`` in trainer firings (catalogue items, then the batch) as the job
    does: its test-then-train step, whose ranking the blend learns from."""
    data = stream if isinstance(stream, Sequence) else list(stream)
    total = sum(1 for x in data if isinstance(x, Sample))
    bar = tqdm(total=total, desc=desc, unit="ev", disable=not progress, mininterval=1.0)
    for items, samples in batches(data, learner.cfg.batch_size):
        if items:
            learner.ingest_items(items, meta, encoder)
        if samples:
            prequential_step(learner, meta, samples)
        bar.update(len(samples))
    bar.close()


def online_prequential(
    cfg: AppConfig,
    stream: Sequence[Item | Sample],
    encoder: TextEncoder | None,
    warmup: float = 0.2,
    k: int = 10,
    n_buckets: int = 10,
    progress: bool = True,
    desc: str = "online",
) -> PrequentialResult:
    """The online learner of ``cfg``, prequentially: a fresh learner learns from the first
    ``warmup`` share of the samples, then is scored test-then-train on the rest.

    This is the "online" model of `rtrec eval` (same split, batches and ranks) and the
    objective of `rtrec tune`. ``encoder`` must match ``cfg.model.text_encoder`` (None for
    "none"); it is passed in so that repeated calls share its embedding memo.
    """
    warm, test = split_stream(stream, warmup)
    learner = OnlineLearner(cfg.model, cfg.trainer, text_dim=encoder.dim if encoder else 0)
    meta = new_meta(cfg.job.model_key)
    warm_up(learner, warm, encoder, meta, progress=progress, desc=f"{desc} warm-up")
    return prequential(
        learner,
        test,
        encoder,
        k=k,
        n_buckets=n_buckets,
        meta=meta,
        progress=progress,
        desc=desc,
    )


def compare(
    cfg: AppConfig,
    stream: Sequence[Item | Sample],
    warmup: float = 0.2,
    k: int = 10,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Language-model features + warm start vs id-only random init, prequentially.

    The first ``warmup`` of the samples is history (pretraining data); every variant is
    scored on the rest, test-then-train. Returns per-variant metrics over the first 10%
    of the test stream, the remaining 90%, and overall.
    """
    import dataclasses

    warm, test = split_stream(stream, warmup)
    encoder = load_configured_encoder(
        cfg.model, cfg.trainer.deterministic, memo_size=1_000_000, cache_dir=cache_dir
    )
    id_only = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_encoder="none"))
    out: dict[str, Any] = {"warmup_fraction": warmup, "k": k, "variants": {}}
    variants = [
        ("online: LM + warm start", cfg, encoder, True, True),
        ("frozen: LM + warm start", cfg, encoder, True, False),
        ("online: LM, random init", cfg, encoder, False, True),
        ("online: id-only + warm start", id_only, None, True, True),
        ("online: id-only, random init", id_only, None, False, True),
    ]
    for name, vcfg, enc, warm_start, learn in variants:
        learner = OnlineLearner(vcfg.model, vcfg.trainer, text_dim=enc.dim if enc else 0)
        meta = new_meta(vcfg.job.model_key)
        if warm_start:
            warm_up(learner, warm, enc, meta)
        else:  # the catalogue (not the interactions) of the warm-up period is known
            learner.ingest_items([x for x in warm if isinstance(x, Item)], meta, enc)
        res = prequential(
            learner,
            test,
            enc,
            k=k,
            n_buckets=10,
            learn=learn,
            meta=meta,
            progress=progress,
            desc=name,
        )
        out["variants"][name] = {
            "first_10pct": res.span(0, 1),
            "rest": res.span(1, 10),
            "overall": res.span(0, 10),
            "per_bucket": [b.as_dict(k) for b in res.buckets],
        }
    return out
