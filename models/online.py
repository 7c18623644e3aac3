"""One call per trainer firing: rebuild the cache if needed, ingest catalogue records,
learn, maybe export.

This is the single entry point the Flink trainer function (and offline replays) use,
so stream and offline runs execute exactly the same learning code.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.config import TrainerConfig
from models.device import deterministic_kernels
from models.events import Item
from models.export import NonFiniteModelError, build_version
from models.gate import GateState, Revocation
from models.history import Sample
from models.metrics import metrics_record, positives, prequential_step
from models.text_encoder import EncodesText
from models.trainer import OnlineLearner, StepResult, check_meta
from models.version import ModelVersion

log = logging.getLogger(__name__)
INITIAL_STATE_FORMAT = 1


@dataclass
class Firing:
    result: StepResult
    version: ModelVersion | None
    # The firing's prequential metrics record (models.metrics.metrics_record): the batch's
    # Recall@K / NDCG@K / MRR / loss measured before learning from it, and the running
    # aggregates; None when the firing had no samples.
    metrics: dict[str, Any] | None = None
    # An automatic rollback of the publication gate (models/gate.py) in this firing.
    revocation: Revocation | None = None


def save_initial_state(learner: OnlineLearner, meta: dict[str, Any], path: str | Path) -> None:
    """Write a learner's full state (what `rtrec pretrain` produces) to ``path``."""
    table, cat = learner.table, learner.catalog
    obj = {
        "format": INITIAL_STATE_FORMAT,
        "dense": learner.dense_blob(),
        "rows": dict(zip(table.index, table.pack_rows(list(table.index.values())), strict=True)),
        "items": dict(zip(cat.index, cat.pack_many(list(cat.index.values())), strict=True)),
        "meta": {k: meta[k] for k in ("step", "events_seen", "positives_trained", "hwm_ts")},
        "text_dim": learner.text_dim,
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(obj, buf)
    Path(path).write_bytes(buf.getvalue())


def load_initial_state(learner: OnlineLearner, meta: dict[str, Any], path: str) -> StepResult:
    """Start a new model key from a pretrain file; returns everything to write to state."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"trainer.initial_state = {path!r} does not exist; run `rtrec pretrain --out {path}` "
            "or set trainer.initial_state = '' to start from a random init"
        )
    obj = torch.load(io.BytesIO(p.read_bytes()), map_location="cpu", weights_only=False)
    if obj.get("format") != INITIAL_STATE_FORMAT:
        raise ValueError(
            f"{path} has initial-state format {obj.get('format')}, expected {INITIAL_STATE_FORMAT}"
        )
    if obj["text_dim"] != learner.text_dim:
        raise ValueError(
            f"{path} was pretrained with a {obj['text_dim']}-dim text encoder, the job's encoder "
            f"gives {learner.text_dim}; use the same model.text_encoder as `rtrec pretrain`"
        )
    meta.update(obj["meta"])
    meta["step"] = obj["meta"]["step"]
    learner.loaded_step = None
    learner.ensure_loaded(
        meta, lambda: obj["dense"], lambda: obj["rows"].items(), lambda: obj["items"].items()
    )
    meta["initial_state"] = str(path)
    return StepResult(
        touched_rows=dict(obj["rows"]), touched_items=dict(obj["items"]), dense_blob=obj["dense"]
    )


def catalogue_horizon(watermark: int, meta: dict[str, Any], deterministic: bool) -> int:
    """Event time up to which catalogue records take effect at a firing.

    The watermark, and outside deterministic mode also the newest event time the model
    has learned from (``meta["hwm_ts"]``). While a job catches up on a backlog, PyFlink
    passes a Python stage's watermark on only when its bundle in flight finishes, so the
    trainer's watermark can stay put for the whole backlog while events long past a
    catalogue record's time are trained on; by the watermark alone the record would wait
    until the input ends.
    An item dated at or before an event already learned existed when that event happened,
    so nothing from the future leaks. Deterministic mode keeps the watermark alone: the
    high-water mark depends on how batches were cut, which the job and its offline replay
    must agree on exactly.
    """
    return watermark if deterministic else max(watermark, int(meta.get("hwm_ts", 0)))


def largest_step(cfg: TrainerConfig) -> int:
    """The most samples one step learns from: ``batch_size``, times ``catchup_factor``
    outside deterministic mode (catch-up steps, :func:`step_due`)."""
    return cfg.batch_size * (1 if cfg.deterministic else max(1, cfg.catchup_factor))


def step_due(buffered: int, cfg: TrainerConfig, idle_s: float, last_step_s: float) -> bool:
    """Whether a trainer holding ``buffered`` samples takes its step now (catch-up steps).

    At ``cfg.batch_size`` samples the step is due while the trainer keeps up with its
    input: more processing time has passed since its previous step ended (``idle_s``)
    than that step took (``last_step_s``). Otherwise samples are arriving faster than it
    learns them, and the step waits for more, up to ``cfg.catchup_factor x batch_size``;
    it is due as soon as the wait grows longer than a step would take. Deterministic mode
    (fixed batches) does not use this. The trainer's flush timer still bounds the wait.
    """
    if buffered < cfg.batch_size:
        return False
    if buffered >= largest_step(cfg):
        return True
    return idle_s >= last_step_s


def train_and_maybe_export(
    learner: OnlineLearner,
    meta: dict[str, Any],
    samples: list[Sample],
    dense_blob: Callable[[], bytes | None],
    rows: Callable[[], Iterable[tuple[str, bytes]]],
    top_k: int,
    config: dict[str, Any],
    force_export: bool = False,
    items_state: Callable[[], Iterable[tuple[str, bytes]]] = lambda: (),
    new_items: list[Item] | None = None,
    encoder: EncodesText | None = None,
    gate_blob: Callable[[], bytes | None] = lambda: None,
) -> Firing:
    """Ingest ``new_items``, test-then-train on ``samples`` (either may be empty), export
    when due.

    ``meta`` is updated in place (step, counters, version); the caller persists it
    together with the result's touched/removed rows and catalogue entries and dense blob.
    In deterministic mode on a GPU the firing runs with deterministic kernels
    (:func:`models.device.deterministic_kernels`). ``gate_blob`` reads the publication
    gate's stored graphs (models/gate.py); a result's ``gate_blob`` is its new value.
    """
    with deterministic_kernels(learner.device, learner.cfg.deterministic):
        check_meta(meta)
        initial = StepResult()
        if meta["step"] == 0 and not meta.get("initialised"):
            meta["initialised"] = True
            if learner.cfg.initial_state:
                initial = load_initial_state(learner, meta, learner.cfg.initial_state)
        learner.ensure_loaded(meta, dense_blob, rows, items_state)
        learner.gate.ensure_loaded(meta, gate_blob)
        ingested = learner.ingest_items(new_items, meta, encoder) if new_items else {}
        record, revocation = None, None
        if samples:  # test-then-train: rank with the current weights, then learn
            batch = prequential_step(learner, meta, samples)
            result = batch.result
            revocation, result.gate_blob = learner.gate.observe(
                meta, positives(samples), batch.ranks, learner.seen
            )
            record = metrics_record(meta, batch)
            record["publication"] = GateState.of(meta).counters()
        else:
            result = StepResult()
        result.touched_rows = {**initial.touched_rows, **result.touched_rows}
        result.touched_items = {**initial.touched_items, **ingested, **result.touched_items}
        for gone in result.removed_items:
            result.touched_items.pop(gone, None)
        for gone in result.removed_rows:
            result.touched_rows.pop(gone, None)
        if result.dense_blob is None:
            result.dense_blob = initial.dense_blob
        version = None
        due = learner.export_due(meta) or (force_export and meta["step"] > meta["last_export_step"])
        if ingested and force_export and meta["version"] == 0:
            due = True  # a catalogue alone is worth publishing (cold start from text)
        if due and len(learner.catalog) > 0:
            try:
                version = build_version(learner, meta, top_k, config)
            except NonFiniteModelError as e:
                log.error("%s", e)
            else:
                meta["version"] = version.version
                meta["last_export_step"] = meta["step"]
                meta["last_export_wall"] = time.time()
                result.gate_blob = learner.gate.decide(meta, version) or result.gate_blob
        return Firing(result, version, record, revocation)
