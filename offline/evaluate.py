"""`rtrec eval`: what online learning buys, measured prequentially against baselines.

The stream is split into a warm-up (the first ``warmup`` share of the samples) and a test
part. Every model learns from the warm-up; then, batch by batch over the test part, every
model first ranks each positive's target among the whole catalogue (test) and then learns
from the batch (train), except "frozen", a copy of the online learner taken after the
warm-up that only ingests catalogue items. Models:

- ``online``: the job's :class:`~models.trainer.OnlineLearner`, learning;
- ``frozen``: the same learner after warm-up, not learning (what a batch-trained model
  deployed at the end of the warm-up would do);
- ``popularity``, ``recent_popularity``, ``isgd``, ``cooccurrence_last_item``,
  ``cooccurrence_windowed``, ``session_knn``: the baselines of :mod:`models.baselines`,
  learning. "online / best baseline" ratios are against the strongest of them.

Metrics (per time bucket = an equal share of the test positives in order, and overall):
Recall@k, NDCG@k, MRR and catalogue coverage of the top-k lists.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from flink_job.config import AppConfig
from models.baselines import Baseline, default_baselines, positives
from models.events import Item
from models.history import Sample
from models.metrics import prequential_step, summary
from models.text_encoder import load_configured_encoder
from models.trainer import OnlineLearner, new_meta
from offline.stream import batches
from offline.training import Bucket, PrequentialResult, split_stream

# Top-k lists (for coverage) are computed for every COVERAGE_EVERY-th test positive only:
# ranking needs one score per target, a top-k list a partial sort of the catalogue per
# sample, and a sample of the lists estimates which items get recommended well enough.
COVERAGE_EVERY = 10
LEARNERS = ("online", "frozen")


def learner_top_k(learner: OnlineLearner, samples: list[Sample], k: int) -> list[list[str]]:
    """The learner's ``k`` best catalogue items per sample, history excluded (as in ranking)."""
    if not samples:
        return []
    cat = learner.catalog
    scores = learner.score_histories(samples)
    vals, idx = torch.topk(scores, min(k, cat.size), dim=1)
    return [
        [cat.ids[j] for j, v in zip(row_i, row_v, strict=True) if math.isfinite(v)]
        for row_i, row_v in zip(idx.tolist(), vals.tolist(), strict=True)
    ]


class _Tracker:
    """Prequential sums and top-k coverage of one model."""

    def __init__(self, k: int, n_buckets: int) -> None:
        self.result = PrequentialResult(k, [Bucket() for _ in range(n_buckets)])
        self.recommended: list[set[str]] = [set() for _ in range(n_buckets)]
        self.seconds = 0.0  # test-then-train time (ranking, top-k lists, learning)


def _coverage(recommended: Iterable[set[str]], catalogue: set[str]) -> float:
    seen: set[str] = set().union(*recommended)
    return len(seen & catalogue) / max(1, len(catalogue))


def _day(ts: int | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts / 1000, tz=UTC).strftime("%Y-%m-%d")


def run_eval(
    cfg: AppConfig,
    stream: Iterable[Item | Sample],
    warmup: float = 0.2,
    k: int = 10,
    n_buckets: int = 10,
    out_dir: str | Path | None = None,
    progress: bool = True,
    baselines: list[Baseline] | None = None,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Prequential comparison of the online learner, its frozen copy and the baselines
    (``baselines`` None = :func:`~models.baselines.default_baselines`); ``cache_dir``:
    where catalogue text vectors are cached across runs (None = nowhere).

    Returns (and with ``out_dir`` writes as ``results.json``, ``results.md`` and two PNG
    plots) the metrics per model, overall and per time bucket, and the online learner's
    drift detections (``drift``: event time, step, and test positives seen before each).
    """
    data = list(stream)
    warm, test = split_stream(data, warmup)
    catalogue = {x.item_id for x in data if isinstance(x, Item)}
    encoder = load_configured_encoder(
        cfg.model, cfg.trainer.deterministic, memo_size=1_000_000, cache_dir=cache_dir
    )
    text_dim = encoder.dim if encoder is not None else 0
    bs = cfg.trainer.batch_size

    online = OnlineLearner(cfg.model, cfg.trainer, text_dim=text_dim)
    meta = new_meta(cfg.job.model_key)
    baselines = default_baselines() if baselines is None else baselines
    detections: list[dict[str, Any]] = []

    def online_step(samples: list[Sample], test_seen: int | None) -> list[int]:
        out = prequential_step(online, meta, samples)
        if out.drift_detected:
            detections.append(
                {"step": meta["step"], "event_time_ms": meta["hwm_ts"], "test_positive": test_seen}
            )
        return out.ranks

    names = [*LEARNERS, *(b.name for b in baselines)]
    trackers = {n: _Tracker(k, n_buckets) for n in names}

    # ------------------------------------------------------------------ warm-up
    warm_batches = list(batches(warm, bs))
    bar = tqdm(warm_batches, desc="warm-up", unit="batch", disable=not progress, mininterval=1.0)
    for items, samples in bar:
        if items:
            online.ingest_items(items, meta, encoder)
        if samples:  # test-then-train like the job (its meta metrics and drift state too)
            online_step(samples, None)
        for b in baselines:
            b.ingest_items(items)
            b.learn(samples)
    bar.close()
    # The frozen model is the online learner as it stands at the end of the warm-up.
    frozen, frozen_meta = copy.deepcopy(online), copy.deepcopy(meta)

    # ------------------------------------------------------------------ test-then-train
    total = len(positives(x for x in test if isinstance(x, Sample)))
    per_bucket = max(1, math.ceil(total / n_buckets))
    first_ts: list[int | None] = [None] * n_buckets
    last_ts: list[int | None] = [None] * n_buckets
    seen = 0
    bar = tqdm(
        total=total, desc="test-then-train", unit="ev", disable=not progress, mininterval=1.0
    )
    for items, samples in batches(test, bs):
        pos = positives(samples)
        bucket_of = [min((seen + j) // per_bucket, n_buckets - 1) for j in range(len(pos))]
        for s, bk in zip(pos, bucket_of, strict=True):
            first_ts[bk] = s.ts if first_ts[bk] is None else first_ts[bk]
            last_ts[bk] = s.ts
        # Every COVERAGE_EVERY-th positive of the test stream also gets a top-k list.
        cov = [j for j in range(len(pos)) if (seen + j) % COVERAGE_EVERY == 0]
        cov_samples = [pos[j] for j in cov]
        for name in names:
            t0 = time.perf_counter()
            tr = trackers[name]
            if name in LEARNERS:
                learner, m = (online, meta) if name == "online" else (frozen, frozen_meta)
                if items:
                    learner.ingest_items(items, m, encoder)
                tops = learner_top_k(learner, cov_samples, k)
                if name == "online" and samples:
                    # The job's own test-then-train step (ranks with the current weights,
                    # then learns): the stream's metrics and these come from one function.
                    ranks = online_step(samples, seen)
                else:
                    ranks = learner.rank_targets(pos)
            else:
                b = next(x for x in baselines if x.name == name)
                b.ingest_items(items)
                ranks = b.rank_targets(pos)
                tops = b.top_k(cov_samples, k)
                b.learn(samples)
            for rank, bk in zip(ranks, bucket_of, strict=True):
                tr.result.buckets[bk].add(rank, k)
            for j, top in zip(cov, tops, strict=True):
                tr.recommended[bucket_of[j]].update(top)
            tr.seconds += time.perf_counter() - t0
        seen += len(pos)
        bar.update(len(pos))
    bar.close()

    # ------------------------------------------------------------------ results
    models: dict[str, Any] = {}
    for name in names:
        tr = trackers[name]
        overall: dict[str, Any] = tr.result.span(0, n_buckets)
        overall["coverage"] = _coverage(tr.recommended, catalogue)
        per = []
        for i, bucket in enumerate(tr.result.buckets):
            d: dict[str, Any] = bucket.as_dict(k)
            d["coverage"] = _coverage([tr.recommended[i]], catalogue)
            per.append(d)
        models[name] = {"overall": overall, "per_bucket": per, "seconds": round(tr.seconds, 2)}
    base_names = [b.name for b in baselines]
    ratios: dict[str, Any] = {}
    for metric in (f"recall@{k}", f"ndcg@{k}", "mrr") if base_names else ():
        best = max(base_names, key=lambda n: models[n]["overall"][metric])
        ratios[metric] = {
            "best_baseline": best,
            "overall": _ratio(models["online"]["overall"][metric], models[best]["overall"][metric]),
            "per_bucket": [
                _ratio(
                    models["online"]["per_bucket"][i][metric],
                    max(models[n]["per_bucket"][i][metric] for n in base_names),
                )
                for i in range(n_buckets)
            ],
        }
    result: dict[str, Any] = {
        "k": k,
        "warmup_fraction": warmup,
        "n_buckets": n_buckets,
        "batch_size": bs,
        "warmup_samples": sum(isinstance(x, Sample) for x in warm),
        "test_samples": sum(isinstance(x, Sample) for x in test),
        "test_positives": total,
        "catalogue_items": len(catalogue),
        "coverage_every": COVERAGE_EVERY,
        "text_encoder": cfg.model.text_encoder,
        "buckets": [
            {"first_ts": first_ts[i], "last_ts": last_ts[i], "start": _day(first_ts[i])}
            for i in range(n_buckets)
        ],
        "models": models,
        "online_vs_best_baseline": ratios,
        "drift": {"detections": detections, "online": summary(meta).get("drift")},
    }
    if out_dir is not None:
        write_report(result, Path(out_dir))
    return result


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _fmt_ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def render_markdown(res: dict[str, Any]) -> str:
    """The report: overall table, per-bucket Recall@k / NDCG@k, online vs best baseline."""
    k, nb = res["k"], res["n_buckets"]
    models = res["models"]
    lines = [
        "# Prequential evaluation: online learning vs baselines",
        "",
        f"Warm-up: the first {res['warmup_fraction']:.0%} of the samples "
        f"({res['warmup_samples']} samples). Test: {res['test_positives']} positives "
        f"(of {res['test_samples']} samples) in {nb} time buckets, test-then-train in batches "
        f"of {res['batch_size']}; ranks are over the whole catalogue ({res['catalogue_items']} "
        f"items) minus the user's history. Coverage = share of the catalogue in any top-{k} "
        f"list, from every {res['coverage_every']}th test positive. Text encoder: "
        f"`{res['text_encoder']}`.",
        "",
        "## Overall",
        "",
        f"| model | Recall@{k} | NDCG@{k} | MRR | coverage@{k} | test seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in models.items():
        o = m["overall"]
        lines.append(
            f"| {name} | {o[f'recall@{k}']:.4f} | {o[f'ndcg@{k}']:.4f} | {o['mrr']:.4f} | "
            f"{o['coverage']:.3f} | {m['seconds']:.1f} |"
        )
    lines.append("")
    for metric in (f"recall@{k}", f"ndcg@{k}", "mrr"):
        r = res["online_vs_best_baseline"].get(metric)
        if r is None:
            continue
        lines.append(
            f"- online / best baseline ({r['best_baseline']}) on {metric}: "
            f"**{_fmt_ratio(r['overall'])}**"
        )
    header = " | ".join(f"{i + 1} ({b['start']})" for i, b in enumerate(res["buckets"]))
    for metric, title in ((f"recall@{k}", f"Recall@{k}"), (f"ndcg@{k}", f"NDCG@{k}")):
        lines += [
            "",
            f"## {title} per time bucket (bucket (first day))",
            "",
            f"| model | {header} |",
            "|---|" + "---:|" * nb,
        ]
        for name, m in models.items():
            vals = " | ".join(f"{b[metric]:.4f}" for b in m["per_bucket"])
            lines.append(f"| {name} | {vals} |")
        if metric in res["online_vs_best_baseline"]:
            ratios = " | ".join(
                _fmt_ratio(x) for x in res["online_vs_best_baseline"][metric]["per_bucket"]
            )
            lines.append(f"| online / best baseline | {ratios} |")
    return "\n".join(lines) + "\n"


def plot_metric(res: dict[str, Any], metric: str, title: str, path: Path) -> None:
    """One line per model over the time buckets (Agg canvas, no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = list(range(1, res["n_buckets"] + 1))
    for name, m in res["models"].items():
        style = {"online": "-", "frozen": "--"}.get(name, ":")
        ax.plot(
            x,
            [b[metric] for b in m["per_bucket"]],
            style,
            marker="o",
            markersize=4,
            linewidth=2.5 if name == "online" else 1.5,
            label=name,
        )
    ax.set_xticks(x, [f"{i}\n{b['start'][:7]}" for i, b in zip(x, res["buckets"], strict=True)])
    ax.set_xlabel("time bucket (equal shares of the test positives, in order) and its start")
    ax.set_ylabel(title)
    ax.set_title(f"{title} over time (prequential, test-then-train)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def write_report(res: dict[str, Any], out_dir: Path) -> None:
    """results.json, results.md, recall_over_time.png and ndcg_over_time.png in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    k = res["k"]
    (out_dir / "results.json").write_text(json.dumps(res, indent=2))
    (out_dir / "results.md").write_text(render_markdown(res))
    plot_metric(res, f"recall@{k}", f"Recall@{k}", out_dir / "recall_over_time.png")
    plot_metric(res, f"ndcg@{k}", f"NDCG@{k}", out_dir / "ndcg_over_time.png")
