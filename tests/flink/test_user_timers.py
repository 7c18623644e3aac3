"""User-window timers that span several windows give what one timer per window gives, on a
real Flink timer service, and samples leave in event-time order up to the span.

A span relies on PyFlink handing ``on_timer`` the watermark that fired it (every window of
the span up to that watermark is applied in that one firing), and on the timer the firing
registers for the span's next window firing later. Were the watermark seen there stale, a
user's later windows would wait for a timer registered behind the final watermark, which
never fires: samples would be missing here. Events trickle through a slow map, so
watermarks pass mid-stream as well as at the end of the input.
"""

from __future__ import annotations

import random
import time

import pytest
from pyflink.common import Duration, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import MapFunction

from flink_job.job import make_env
from flink_job.operators import key_by_field
from models.config import UserStageConfig
from models.events import Event
from udfs.records import EVENT_TYPE, SAMPLE_TYPE, PicklableOutputTag, event_to_row
from udfs.user_window import UserWindows

pytestmark = pytest.mark.flink

LATE = PicklableOutputTag("late", EVENT_TYPE)


class RowTs(TimestampAssigner):
    def extract_timestamp(self, value, record_timestamp):
        return int(value[4])


class Slowly(MapFunction):
    def map(self, value):
        time.sleep(0.004)
        return value


def _events() -> list[tuple]:
    """Sessions of 3-8 events 0.2-2.5 s apart from 6 users, in event-time order."""
    rng = random.Random(7)
    rows, ts = [], 10_000
    for _session in range(60):
        user = f"u{rng.randrange(6)}"
        for _ in range(rng.randint(3, 8)):
            ts += rng.randint(200, 2500)
            item = f"i{rng.randrange(40)}"
            rows.append(event_to_row(Event(f"e{len(rows)}", user, item, "click", ts)))
    return rows


def _samples(make_cfg, rows: list[tuple], span_ms: int) -> list[tuple]:
    cfg = make_cfg(
        "job.parallelism=1",
        "job.checkpoint_interval_ms=0",
        "job.bundle_time_ms=50",
        'job.flink={"pipeline.auto-watermark-interval" = "50 ms"}',
    )
    env = make_env(cfg)
    events = (
        env.from_collection(rows, type_info=EVENT_TYPE)
        .map(Slowly(), output_type=EVENT_TYPE)
        .assign_timestamps_and_watermarks(
            WatermarkStrategy.for_bounded_out_of_orderness(
                Duration.of_millis(3000)
            ).with_timestamp_assigner(RowTs())
        )
    )
    windows = UserWindows(
        UserStageConfig(), 5, "m", 1000, LATE, earlier_layout=False,
        timer_span_ms=span_ms,
    )  # fmt: skip
    samples = key_by_field(events, 1).process(windows, output_type=SAMPLE_TYPE)
    with samples.execute_and_collect() as results:
        return [tuple(r) for r in results]


def test_timer_spans_lose_nothing_change_nothing_and_keep_event_time_order(make_cfg):
    rows = _events()
    started = time.monotonic()
    per_window = _samples(make_cfg, rows, 0)
    assert time.monotonic() - started > 1.0, "the input did not trickle: no mid-stream watermark"
    assert len(per_window) == len(rows)  # one sample per event, nothing late
    for span in (5000, 10**9):
        spanned = _samples(make_cfg, rows, span)
        assert sorted(spanned) == sorted(per_window)
        # Per user, the same samples in the same order (users interleave differently).
        for user in sorted({r[1] for r in rows}):
            mine = [s for s in spanned if s[1] == user]
            assert mine == [s for s in per_window if s[1] == user], (span, user)
        # Across users, no sample leaves more than a span (+ a window) after a later one.
        latest = -(2**63)
        for s in spanned:
            assert s[6] > latest - span - 1000, (span, s)
            latest = max(latest, s[6])
