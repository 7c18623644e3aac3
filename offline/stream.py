"""The job's logic without Flink: records -> (catalogue items, training samples), in order.

Used by `rtrec pretrain` and offline evaluation; it calls the same ``models`` functions the
Flink functions call (parse, per-user history, learner), event by event.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flink_job.config import AppConfig
from models.events import Event, InvalidRecord, Item, parse_event, parse_item, pseudonymise
from models.history import Sample, UserState, advance_user, rate_limited
from models.online import train_and_maybe_export
from models.text_encoder import TextEncoder
from models.trainer import OnlineLearner, new_meta
from models.version import ModelVersion
from replay.datasets import Record


def to_stream(records: Iterable[Record], cfg: AppConfig) -> Iterator[Item | Sample]:
    """Valid catalogue items and training samples in record order (invalid ones skipped)."""
    users: dict[str, UserState] = {}
    h = cfg.model.history_length
    for rec in records:
        try:
            if rec.topic == "items":
                yield parse_item(rec.value)
                continue
            e = parse_event(rec.value)
        except InvalidRecord:
            continue
        st, samples = advance_user(users.get(e.user_id), [e], cfg.user, h, cfg.job.model_key)
        users[e.user_id] = st
        yield from samples


def batches(
    stream: Iterable[Item | Sample], batch_size: int
) -> Iterator[tuple[list[Item], list[Sample]]]:
    """Group a stream into trainer firings: pending items + up to ``batch_size`` samples."""
    items: list[Item] = []
    samples: list[Sample] = []
    for x in stream:
        if isinstance(x, Item):
            items.append(x)
            continue
        samples.append(x)
        if len(samples) >= batch_size:
            yield items, samples
            items, samples = [], []
    if items or samples:
        yield items, samples


def job_firings(
    records: Iterable[Record], cfg: AppConfig
) -> Iterator[tuple[list[Item], list[Sample], bool]]:
    """The trainer firings of the Flink job in deterministic mode (``trainer.deterministic``),
    without Flink: ``(catalogue items, samples, final)`` per call of the learner.

    Mirrors the job graph for input in event-time order (no late events): user ids are
    pseudonymised as ParseEvents does; each user's events are grouped into tumbling
    windows of ``job.window_ms`` and applied with :func:`advance_user`; a sample's time is
    its window's last millisecond (the window output's record timestamp). The trainer
    (udfs/trainer.py ``_drain``) then runs one event-time timer per distinct sample and
    catalogue time, in order: at time T the catalogue records with ts <= T are ingested
    (with the first firing at T) and the samples with time <= T, sorted by (time, ts, user,
    event id), are cut into batches of exactly ``trainer.batch_size`` (a partial batch
    waits; a timer with no full batch still fires, to ingest items). At the end of the
    input, everything left is one final firing.
    """
    from flink_job.keys import pseudonymisation_key

    key = pseudonymisation_key(cfg).encode()
    w = cfg.job.window_ms
    h, mk = cfg.model.history_length, cfg.job.model_key
    items: list[Item] = []
    windows: dict[tuple[str, int], list[Event]] = {}
    for rec in records:
        try:
            if rec.topic == "items":
                items.append(parse_item(rec.value))
                continue
            e = parse_event(rec.value)
        except InvalidRecord:
            continue
        if key:
            e = Event(e.event_id, pseudonymise(e.user_id, key), e.item_id, e.type, e.ts, e.value)
        windows.setdefault((e.user_id, e.ts - e.ts % w), []).append(e)
    users: dict[str, UserState] = {}
    timed: list[tuple[int, Sample]] = []
    for (user, start), events in sorted(windows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        events, _ = rate_limited(events, cfg.user.max_events_per_window)  # excess: the DLQ
        st, samples = advance_user(users.get(user), events, cfg.user, h, mk)
        users[user] = st
        timed += [(start + w - 1, s) for s in samples]
    timed.sort(key=lambda e: (e[0], e[1].ts, e[1].user_id, e[1].event_id))
    items.sort(key=lambda it: (it.ts, it.item_id))  # the trainer's order of due items
    bs = cfg.trainer.batch_size
    next_item = next_sample = cut = 0  # samples[cut:next_sample] wait for a full batch
    for t in sorted({ts for ts, _ in timed} | {it.ts for it in items}):
        start_item = next_item
        while next_item < len(items) and items[next_item].ts <= t:
            next_item += 1
        due = items[start_item:next_item]
        while next_sample < len(timed) and timed[next_sample][0] <= t:
            next_sample += 1
        full = cut + (next_sample - cut) // bs * bs
        if full == cut:
            yield due, [], False
        for i, b in enumerate(range(cut, full, bs)):
            yield (due if i == 0 else []), [s for _, s in timed[b : b + bs]], False
        cut = full
    yield items[next_item:], [s for _, s in timed[cut:]], True


@dataclass
class OfflineTrainerRun:
    """What :func:`trainer_without_flink` produced: the trainer's final meta state, one metrics
    record per firing that trained (the job's ``metrics`` topic) and the model versions."""

    meta: dict[str, Any]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    versions: list[ModelVersion] = field(default_factory=list)
    # The publication gate's automatic rollbacks (models.gate.Revocation.record()).
    revocations: list[dict[str, Any]] = field(default_factory=list)


def trainer_without_flink(
    records: Iterable[Record],
    cfg: AppConfig,
    encoder: TextEncoder | None = None,
    restore_every: int = 0,
) -> OfflineTrainerRun:
    """Run the trainer of a deterministic-mode job over ``records`` without Flink: the
    firings of :func:`job_firings`, each through :func:`models.online.train_and_maybe_export`
    (what udfs/trainer.py calls), with the trainer's state kept in dicts.

    ``restore_every`` > 0 drops the in-memory learner every that many firings and starts a
    fresh one, which then rebuilds itself from the state dicts, as after a Flink restore:
    the versions must not change (everything the model needs is in state)."""
    from flink_job.config import to_dict

    def fresh() -> OnlineLearner:
        return OnlineLearner(cfg.model, cfg.trainer, text_dim=encoder.dim if encoder else 0)

    learner = fresh()
    meta = new_meta(cfg.job.model_key)
    rows: dict[str, bytes] = {}
    cat: dict[str, bytes] = {}
    dense: list[bytes | None] = [None]
    gate: list[bytes | None] = [None]
    out = OfflineTrainerRun(meta)
    config = to_dict(cfg)
    for n, (items, samples, final) in enumerate(job_firings(records, cfg), 1):
        if restore_every and n % restore_every == 0:
            learner = fresh()
            meta = pickle.loads(pickle.dumps(meta))  # as the job's meta state would be
            out.meta = meta
        firing = train_and_maybe_export(
            learner,
            meta,
            samples,
            lambda: dense[0],
            rows.items,
            cfg.export.top_k,
            config,
            force_export=final,
            items_state=cat.items,
            new_items=items,
            encoder=encoder,
            gate_blob=lambda: gate[0],
        )
        r = firing.result
        rows.update(r.touched_rows)
        for gone in r.removed_rows:
            rows.pop(gone, None)
        cat.update(r.touched_items)
        for gone in r.removed_items:
            cat.pop(gone, None)
        if r.dense_blob is not None:
            dense[0] = r.dense_blob
        if r.gate_blob is not None:
            gate[0] = r.gate_blob
        if firing.revocation is not None:
            out.revocations.append(firing.revocation.record())
        if firing.metrics is not None:
            out.metrics.append(firing.metrics)
        if firing.version is not None:
            out.versions.append(firing.version)
    return out
