"""A watermark that fires many timers releases their output as the bundle time passes.

Flink fires every timer a watermark makes due in one call, so PyFlink's bundle-time check
(a mailbox action) never ran in between, and a keyed stage's bundle of timers ended only
at the bundle size. Its output reaches the next stage when a bundle ends: in the job, the
samples of thousands of user windows reached the trainer seconds late, all at once, while
it idled. rtrec's keyed process operator (flink_job/java) checks the bundle's age after
each timer, and ends a bundle of timers at as many as the function fired in one bundle
time before (1,000 before it knows). Here one end-of-input watermark fires KEYS timers of
~1 ms each (~3 s), with a bundle size far above that and bundles of 100 ms: the next stage
must receive outputs while the timers are still firing, and every output exactly once.
"""

from __future__ import annotations

import time

import pytest
from pyflink.common import Types, WatermarkStrategy
from pyflink.datastream import KeyedProcessFunction, OutputTag

from flink_job.job import make_env
from flink_job.operators import key_by_field
from tests.flink.helpers import FieldTs

pytestmark = pytest.mark.flink

KEYS = 3000
TIMER_S = 0.001


class FireSlowly(KeyedProcessFunction):
    """One event-time timer per key at its element's ts; firing takes TIMER_S and emits
    (key, wall time of the firing)."""

    def process_element(self, value, ctx):
        ctx.timer_service().register_event_time_timer(ctx.timestamp())
        return iter(())

    def on_timer(self, timestamp, ctx):
        time.sleep(TIMER_S)
        yield ctx.get_current_key(), time.time()


SIDE = OutputTag("side", Types.STRING())


class FireSlowlyWithSide(FireSlowly):
    """FireSlowly with a side output, as the user windows have (late events)."""

    def process_element(self, value, ctx):
        ctx.timer_service().register_event_time_timer(ctx.timestamp())
        if value[1] < 0:  # never here: the side output only has to exist
            yield SIDE, value[0]


class Arrival(KeyedProcessFunction):
    """(key, fired at, wall time it reached this stage)."""

    def process_element(self, value, ctx):
        yield value[0], value[1], time.time()


ARRIVAL_TYPE = Types.TUPLE([Types.STRING(), Types.DOUBLE(), Types.DOUBLE()])


def _fired_at_end(make_cfg, fire: KeyedProcessFunction):
    """(rows, stream of ``fire``'s timer outputs): KEYS keys whose timers one end-of-input
    watermark fires (no watermark before it), bundles of 100 ms and a huge bundle size."""
    cfg = make_cfg(
        "job.parallelism=1",
        "job.checkpoint_interval_ms=0",
        "job.bundle_size=1000000",
        "job.bundle_time_ms=100",
    )
    env = make_env(cfg)
    rows = [(f"k{i:04d}", 1000 + i) for i in range(KEYS)]
    fired = (
        env.from_collection(rows, type_info=Types.TUPLE([Types.STRING(), Types.LONG()]))
        .assign_timestamps_and_watermarks(
            WatermarkStrategy.no_watermarks().with_timestamp_assigner(FieldTs(1))
        )
        .key_by(lambda r: r[0], key_type=Types.STRING())
        .process(fire, output_type=Types.TUPLE([Types.STRING(), Types.DOUBLE()]))
    )
    return rows, fired


def test_timers_fired_by_one_watermark_stream_their_output(make_cfg):
    rows, fired = _fired_at_end(make_cfg, FireSlowly())
    out = fired.key_by(lambda r: r[0], key_type=Types.STRING()).process(
        Arrival(), output_type=ARRIVAL_TYPE
    )
    # Without the bundle-time check every output arrives after the last timer has fired.
    _assert_streamed(out, rows)


def _assert_streamed(out, rows) -> None:
    """Every key's output arrived once, and the first one long before the last timer fired."""
    with out.execute_and_collect() as results:
        got = [tuple(r) for r in results]
    assert sorted(k for k, _, _ in got) == [k for k, _ in rows]  # each output once
    first_arrival = min(a for _, _, a in got)
    fired = sorted(f for _, f, _ in got)
    assert fired[-1] - fired[0] > 2.0, "the timers fired faster than this test assumes"
    assert first_arrival < fired[-1] - 1.0, (
        f"the first output reached the next stage {first_arrival - fired[0]:.2f} s after "
        f"the first timer fired, and the timers fired for {fired[-1] - fired[0]:.2f} s"
    )


def test_timer_output_streams_through_a_key_by_after_a_side_output(make_cfg):
    """The job's shape: user windows have a side output, then a key_by to the trainer.

    A side output keeps PyFlink from fusing the Python map that its own ``key_by`` adds
    into the function before it, so that map is an operator of its own in the same task,
    and holds what it has keyed until its bundle ends, by size only while a watermark fires
    timers (with PyFlink's key_by in place of ``key_by_field`` this test fails: the outputs
    arrive with the last timers). ``key_by_field`` keys the records in the JVM instead.
    """
    rows, fired = _fired_at_end(make_cfg, FireSlowlyWithSide())
    fired.get_side_output(SIDE).print()
    out = key_by_field(fired, 0).process(Arrival(), output_type=ARRIVAL_TYPE)
    _assert_streamed(out, rows)
