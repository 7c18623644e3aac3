"""`rtrec replay`: write a dataset into the events / items topics with a progress bar."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from tqdm import tqdm

from flink_job.config import AppConfig
from infra.kafka import MAX_MESSAGE_BYTES, client_properties, create_topics
from replay.datasets import Record, ReplayStats, records

log = logging.getLogger(__name__)


def replay(
    cfg: AppConfig,
    bootstrap: str,
    rate: float = 0.0,
    progress: bool = True,
    source: Iterable[Record] | None = None,
) -> ReplayStats:
    """Produce the configured dataset (or the records of ``source``, e.g. a slice of it);
    ``rate`` > 0 throttles to that many records/s. Catalogue records are dropped when the
    job has no catalogue topic (``kafka.items_topic = ''``)."""
    from kafka import KafkaProducer

    k = cfg.kafka
    create_topics(bootstrap, k.topics(), k.partitions, k.properties)
    producer = KafkaProducer(
        **client_properties(
            bootstrap,
            k.properties,
            KafkaProducer,
            acks="all",
            linger_ms=20,
            batch_size=256 * 1024,
            max_request_size=MAX_MESSAGE_BYTES,
        )
    )
    topic_of = {"events": k.events_topic, "items": k.items_topic}
    stats = ReplayStats()
    t0 = time.monotonic()
    bar = tqdm(
        desc=f"replay -> {k.events_topic}", unit="rec", disable=not progress, mininterval=0.5
    )
    try:
        recs = records(cfg.replay, stats) if source is None else _counted(source, stats)
        for n, rec in enumerate(recs, 1):
            if not topic_of[rec.topic]:
                continue
            # The record timestamp is the event time: the job's watermarks are per partition,
            # computed in the Kafka source from record timestamps.
            producer.send(topic_of[rec.topic], key=rec.key, value=rec.value, timestamp_ms=rec.ts)
            bar.update(1)
            if rate > 0:
                ahead = n / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        producer.flush(timeout=120)
    finally:
        bar.close()
        producer.close(timeout=30)
    log.info(
        "replayed %d events (%d malformed) and %d catalogue records in %.1fs",
        stats.events,
        stats.malformed,
        stats.items,
        time.monotonic() - t0,
    )
    return stats


def _counted(source: Iterable[Record], stats: ReplayStats) -> Iterable[Record]:
    for rec in source:
        if rec.topic == "items":
            stats.items += 1
        elif rec.valid:
            stats.events += 1
        else:
            stats.malformed += 1
        yield rec
