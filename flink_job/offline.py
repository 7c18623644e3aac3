"""The job's logic without Flink: records -> (catalogue items, training samples), in order.

Used by `rtrec pretrain` and offline evaluation; it calls the same ``models`` functions the
Flink functions call (parse, per-user history, learner), event by event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from flink_job.config import AppConfig
from flink_job.datasets import Record
from models.events import InvalidRecord, Item, parse_event, parse_item
from models.history import Sample, UserState, advance_user


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
