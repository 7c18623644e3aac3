"""The user stage on Flink's window operator (``flink_job.operators.windows_by_field``):
each closed window reaches ``UserWindows`` once, in its user's window order, with every
event of the window in arrival order; late events reach the late stream; nothing is lost.

Events trickle through a slow map so that watermarks pass mid-stream (windows close one
by one) as well as at the end of the input. The expected samples are computed without
Flink, one ``advance_user`` call per (user, window), as the stage must.
"""

from __future__ import annotations

import random
import time

import pytest
from pyflink.common import Duration, WatermarkStrategy
from pyflink.datastream import MapFunction

from flink_job.job import make_env
from flink_job.operators import windows_by_field
from models.config import UserStageConfig
from models.events import Event
from models.history import advance_user
from tests.flink.helpers import FieldTs
from udfs.records import EVENT_TYPE, SAMPLE_TYPE, event_to_row, row_to_event, sample_to_row
from udfs.user_window import UserWindows

pytestmark = pytest.mark.flink

WINDOW_MS = 1000
OUT_OF_ORDER_MS = 1500


class Slowly(MapFunction):
    def map(self, value):
        time.sleep(0.004)
        return value


def _events() -> tuple[list[tuple], set[str]]:
    """Sessions of 3-8 events 0.2-2.5 s apart from 6 users, mostly in event-time order,
    some up to 1 s out of order (on time) and some half an hour behind (late: ids returned)."""
    rng = random.Random(7)
    rows, late, ts = [], set(), 10_000_000
    for _session in range(60):
        user = f"u{rng.randrange(6)}"
        for _ in range(rng.randint(3, 8)):
            ts += rng.randint(200, 2500)
            item = f"i{rng.randrange(40)}"
            jitter = -rng.randint(0, 1000) if rng.random() < 0.2 else 0
            rows.append(event_to_row(Event(f"e{len(rows)}", user, item, "click", ts + jitter)))
        if len(rows) > 100 and rng.random() < 0.2:
            # Far behind: the watermark trails the newest event by the events of a few
            # bundles (minutes of event time here), not by the out-of-orderness alone.
            eid = f"e{len(rows)}"
            rows.append(event_to_row(Event(eid, user, "i0", "click", ts - 2_000_000)))
            late.add(eid)
    return rows, late


def _expected(rows: list[tuple], late: set[str]) -> dict[str, list[tuple]]:
    """Per user: the samples of one advance_user call per window, in window order."""
    windows: dict[str, dict[int, list]] = {}
    for r in rows:
        if r[0] not in late:
            last_ms = r[4] - r[4] % WINDOW_MS + WINDOW_MS - 1
            windows.setdefault(r[1], {}).setdefault(last_ms, []).append(row_to_event(r))
    out = {}
    for user, mine in windows.items():
        history, samples = None, []
        for last_ms in sorted(mine):
            history, s = advance_user(history, mine[last_ms], UserStageConfig(), 5, "m")
            samples += [sample_to_row(x) for x in s]
        out[user] = samples
    return out


def test_each_closed_window_is_applied_once_in_order_and_late_events_are_split_off(make_cfg):
    rows, late = _events()
    assert 5 <= len(late) < len(rows) // 10
    cfg = make_cfg(
        "job.parallelism=2",
        "job.checkpoint_interval_ms=0",
        "job.bundle_time_ms=50",
        "job.bundle_size=10",  # (the slow map hands on its output 10 at a time)
        'job.flink={"pipeline.auto-watermark-interval" = "50 ms"}',
    )
    env = make_env(cfg)
    events = (
        env.from_collection(rows, type_info=EVENT_TYPE)
        .map(Slowly(), output_type=EVENT_TYPE)
        .set_parallelism(1)
        .assign_timestamps_and_watermarks(
            WatermarkStrategy.for_bounded_out_of_orderness(
                Duration.of_millis(OUT_OF_ORDER_MS)
            ).with_timestamp_assigner(FieldTs(4))
        )
        .set_parallelism(1)
    )
    windows, late_events = windows_by_field(events, 1, WINDOW_MS, "user-window-events")
    samples = windows.process(
        UserWindows(UserStageConfig(), 5, "m"),
        output_type=SAMPLE_TYPE,
    )
    tagged = samples.map(lambda s: ("sample", s[1], s), output_type=None).union(
        late_events.map(lambda e: ("late", e[1], e), output_type=None)
    )
    started = time.monotonic()
    with tagged.execute_and_collect() as results:
        out = [tuple(r) for r in results]
    assert time.monotonic() - started > 1.0, "the input did not trickle: no mid-stream watermark"

    # Which far-behind events the watermark had passed depends on timing (PyFlink hands
    # on watermarks per bundle); an event at most 1 s out of order is never late.
    late_seen = {r[2][0] for r in out if r[0] == "late"}
    assert late_seen and late_seen <= late, sorted(late_seen - late)
    got = [tuple(r[2]) for r in out if r[0] == "sample"]
    assert len(got) + len(late_seen) == len(rows)  # each event once: a sample or late
    want = _expected(rows, late_seen)
    for user, samples_of_user in want.items():
        assert [s for s in got if s[1] == user] == samples_of_user, user
    # A window's samples carry its last millisecond as their timestamp (the trainer's
    # deterministic mode orders by it): every sample's ts is inside its window.
    assert all(s[6] <= s[6] - s[6] % WINDOW_MS + WINDOW_MS - 1 for s in got)
