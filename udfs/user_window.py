"""Closed windows of a user's events -> per-user history in keyed state -> samples.

The windows are Flink's own (``flink_job.operators.windows_by_field``): tumbling event-time
windows of ``job.window_ms`` per user, kept in the JVM by Flink's window operator, which
passes each closed window to :class:`UserWindows` as one element ``(user, [event row, ...])``
(arrival order) with the window's last millisecond as its timestamp, and sends an event
whose window the watermark has passed to its late side output (the DLQ).

So this stage's Python does one thing per window: one :func:`models.history.advance_user`
call, one state write, the window's samples emitted with the window's timestamp. It keeps
no events and sets no timers: registering and firing a Python timer per window (each
encoded through PyFlink's row coder) would be most of this stage's CPU
(docs/pyflink-notes.md, "Window contents are not in the Python state cache").
"""

from __future__ import annotations

from pyflink.common import Time, Types
from pyflink.datastream import KeyedCoProcessFunction, KeyedProcessFunction
from pyflink.datastream.state import StateTtlConfig, ValueStateDescriptor

from models.config import UserStageConfig
from models.events import dead_letter
from models.history import RATE_LIMIT_REASON, advance_user, forget, rate_limited
from udfs.malloc import keep_large_blocks
from udfs.parse import DLQ_TAG
from udfs.records import row_to_event, sample_to_row


class UserWindows(KeyedProcessFunction):
    """Per-user history: applies each closed window of a user's events to the user's state
    and emits one sample per event (keyed by user, after ``windows_by_field``)."""

    def __init__(
        self,
        cfg: UserStageConfig,
        history_length: int,
        model_key: str,
        malloc_thresholds: bool = True,
        source_topic: str = "events",
    ) -> None:
        """``malloc_thresholds``: ``job.malloc_thresholds`` (udfs/malloc.py);
        ``source_topic``: named in the dead letters of rate-limited events."""
        self.source = source_topic
        self.cfg = cfg
        self.history_length = history_length
        self.model_key = model_key
        self.malloc_thresholds = malloc_thresholds

    def open(self, runtime_context):
        if self.malloc_thresholds:
            keep_large_blocks()
        user = ValueStateDescriptor("user", Types.PICKLED_BYTE_ARRAY())
        ttl_ms = int(self.cfg.state_ttl_hours * 3600 * 1000)
        if ttl_ms > 0:
            # ReturnExpiredIfNotCleanedUp, not NeverReturnExpired: with the latter PyFlink
            # turns off the Python state cache of the whole worker (every state read and
            # write of every operator becomes a blocking round trip to the JVM). Expired
            # histories are dropped in the background as the state is accessed and from
            # full snapshots, so one can outlive its TTL until then.
            user.enable_time_to_live(
                StateTtlConfig.new_builder(Time.milliseconds(ttl_ms))
                .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
                .set_state_visibility(StateTtlConfig.StateVisibility.ReturnExpiredIfNotCleanedUp)
                .cleanup_incrementally(10, False)
                .cleanup_full_snapshot()
                .build()
            )
        # One value per user, the models.history.UserState itself (pickled when the bundle
        # commits), so the state cache answers every read after a user's first.
        self.user = runtime_context.get_state(user)

    def process_element(self, value, ctx):
        events, excess = rate_limited(
            [row_to_event(r) for r in value[1]], self.cfg.max_events_per_window
        )
        history, samples = advance_user(
            self.user.value(), events, self.cfg, self.history_length, self.model_key
        )
        self.user.update(history)
        for s in samples:
            yield sample_to_row(s)
        for e in excess:
            payload = f"event_id={e.event_id} item_id={e.item_id} ts={e.ts}"
            yield DLQ_TAG, dead_letter(payload, RATE_LIMIT_REASON, self.source)


class UserWindowsWithControl(KeyedCoProcessFunction):
    """:class:`UserWindows` with a second input, forget requests keyed by user (event rows
    of type "forget", udfs/parse.py ParseControl): a request replaces the user's state by
    :func:`models.history.forget` (their history and dedup set go; their events up to the
    request that are still in open windows are dropped when those close; later ones start
    a new user) and counts it (Flink counter ``users_forgotten``)."""

    def __init__(self, *args, **kwargs) -> None:
        self.windows = UserWindows(*args, **kwargs)

    def open(self, runtime_context):
        self.windows.open(runtime_context)
        self.forgotten = runtime_context.get_metrics_group().counter("users_forgotten")

    def process_element1(self, value, ctx):
        yield from self.windows.process_element(value, ctx)

    def process_element2(self, value, ctx):
        request = row_to_event(value)
        self.windows.user.update(forget(request.ts))
        self.forgotten.inc()
        return iter(())
