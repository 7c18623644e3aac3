"""key_by(user) -> this function: tumbling event-time windows of a user's events -> per-user
history in keyed state -> samples.

Same semantics as ``.window(TumblingEventTimeWindows.of(window_ms))`` with a process window
function, built on keyed state and event-time timers (see "Timers"): PyFlink's window
operator keeps each window's contents in a state namespace of its own, which the Python
state cache never holds, so every window cost a blocking round trip to the JVM to read its
contents (the job's largest Flink overhead, see README "Optimisations"). Here a user's
not-yet-fired events live beside their history in one value that the cache keeps.

- An event belongs to the window [start, start + window_ms) of its record timestamp.
- It is late (-> ``late_tag``) when its window's last millisecond is <= the watermark,
  exactly when Flink's window operator would drop it.
- At the window's last millisecond (event time) the window's events are applied to the
  user's history in one :func:`models.history.advance_user` call; the samples are emitted
  with that timestamp, as a window's output is.

Timers. Event time is cut into spans of ``timer_span_ms`` (a multiple of the window,
aligned like the windows). A user has one pending timer per span that holds pending
windows, at the end of the earliest of them; its firing applies every window of that span
(and any earlier one) that the watermark has passed, one ``advance_user`` call per window
in window order (the same history and samples as one firing per window), then registers
the next pending window of the span, which the watermark has not passed. The JVM fires
timers in time order across users, so samples leave this stage in event-time order up to
the span, grouped by user within it. While a backlog is read the watermark jumps past
several of a user's windows at once (sessions of events seconds apart): a timer per window
made registering and firing timers this stage's largest cost (a registration goes through
PyFlink's timer coder: ~40% of the worker's CPU in a profile). A span of one window is one
timer per window; deterministic mode uses that, since its trainer orders samples by their
record timestamp, the firing's, which is then the window's end.
"""

from __future__ import annotations

import pickle

from pyflink.common import Time, Types
from pyflink.datastream import KeyedProcessFunction, OutputTag
from pyflink.datastream.state import ListStateDescriptor, StateTtlConfig, ValueStateDescriptor

from models.config import UserStageConfig
from models.history import advance_user
from udfs.records import EVENT_TYPE, row_to_event, sample_to_row


class UserWindows(KeyedProcessFunction):
    """Per-user tumbling windows: buffers a user's events until the watermark passes the end
    of their window, then applies them to the user's state and emits one sample per event."""

    def __init__(
        self,
        cfg: UserStageConfig,
        history_length: int,
        model_key: str,
        window_ms: int,
        late_tag: OutputTag,
        earlier_layout: bool = True,
        timer_span_ms: int = 0,
    ) -> None:
        """``earlier_layout``: whether state written by earlier releases may be restored
        (the job starts from a savepoint or retained checkpoint). Without it a user's first
        touch reads one state from the JVM instead of two. ``timer_span_ms``: see "Timers"
        above (rounded down to a multiple of ``window_ms``; 0 = one timer per window)."""
        self.cfg = cfg
        self.history_length = history_length
        self.model_key = model_key
        self.window_ms = window_ms
        self.late_tag = late_tag
        self.earlier_layout = earlier_layout
        self.span_ms = max(1, timer_span_ms // window_ms) * window_ms

    def open(self, runtime_context):
        user = ValueStateDescriptor("user", Types.PICKLED_BYTE_ARRAY())
        ttl_ms = int(self.cfg.state_ttl_hours * 3600 * 1000)
        if ttl_ms > 0:
            # ReturnExpiredIfNotCleanedUp, not NeverReturnExpired: with the latter PyFlink
            # turns off the Python state cache of the whole worker (every state read and
            # write of every operator became a blocking round trip to the JVM; the job ran
            # at half speed). Expired histories are dropped in the background as the state
            # is accessed and from full snapshots, so one can outlive its TTL until then.
            user.enable_time_to_live(
                StateTtlConfig.new_builder(Time.milliseconds(ttl_ms))
                .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite)
                .set_state_visibility(StateTtlConfig.StateVisibility.ReturnExpiredIfNotCleanedUp)
                .cleanup_incrementally(10, False)
                .cleanup_full_snapshot()
                .build()
            )
        # One value per user: [history, pending], pending = (record timestamp, event row) of
        # the windows not fired yet, in arrival order. Kept as the Python object (pickled
        # when the bundle commits), so the state cache answers every read after a user's
        # first: a separate list state of pending events had to be fetched from the JVM,
        # one blocking round trip, whenever it had been appended to without being read.
        self.user = runtime_context.get_state(user)
        # State of releases before that: the history as pickled bytes in "user" and the
        # pending events in this list (moved over on a user's first touch).
        self.legacy_pending = runtime_context.get_list_state(
            ListStateDescriptor("pending", Types.TUPLE([Types.LONG(), EVENT_TYPE]))
        )

    def _load(self) -> list:
        """[history or None, pending] of the current user (state of an earlier release is
        moved into this layout; the caller writes it back)."""
        value = self.user.value()
        if isinstance(value, list):
            return value
        if value is None and not self.earlier_layout:
            # A new user: without a restore, only this layout was ever written, so the
            # list of the earlier one is empty. Not reading it saves a blocking round
            # trip to the JVM per new user (a user's first read misses the state cache).
            return [None, []]
        history = pickle.loads(value) if value is not None else None
        pending = list(self.legacy_pending.get())
        if pending:
            self.legacy_pending.clear()
        return [history, pending]

    def _last_ms(self, ts: int) -> int:
        """The last millisecond of the window of record timestamp ``ts``."""
        return ts - ts % self.window_ms + self.window_ms - 1

    def _span_of(self, last_ms: int) -> int:
        """The span (its first millisecond) that holds the window ending at ``last_ms``."""
        return last_ms - last_ms % self.span_ms

    def process_element(self, value, ctx):
        ts = ctx.timestamp()
        last_ms = self._last_ms(ts)
        if last_ms <= ctx.timer_service().current_watermark():
            yield self.late_tag, value
            return
        state = self._load()
        pending = state[1]
        # A pending window of the same span ending at or before this one has a timer that
        # is still to fire at or before it (on_timer keeps it so): no new timer.
        span = self._span_of(last_ms)
        covered = any(
            lm <= last_ms and self._span_of(lm) == span
            for lm in (self._last_ms(t) for t, _ in pending)
        )
        pending.append((ts, value))
        self.user.update(state)
        if not covered:
            ctx.timer_service().register_event_time_timer(last_ms)

    def on_timer(self, timestamp, ctx):
        history, pending = self._load()
        # Due: every window of this timer's span (or an earlier one) that the watermark has
        # passed. One window per span: exactly this timer's window.
        span_end = self._span_of(timestamp) + self.span_ms - 1
        due_by = min(max(timestamp, ctx.timer_service().current_watermark()), span_end)
        windows: dict[int, list] = {}
        rest = []
        for ts, row in pending:
            last_ms = self._last_ms(ts)
            if last_ms <= due_by:
                windows.setdefault(last_ms, []).append(row)
            else:
                rest.append((ts, row))
        samples = []
        for last_ms in sorted(windows):
            history, window_samples = advance_user(
                history,
                [row_to_event(r) for r in windows[last_ms]],
                self.cfg,
                self.history_length,
                self.model_key,
            )
            samples.extend(window_samples)
        self.user.update([history, rest])
        # The span's next pending window ends after the watermark; later spans have their
        # own timers. (Registering a timer that exists already is a no-op.)
        later = [lm for lm in (self._last_ms(t) for t, _ in rest) if lm <= span_end]
        if later:
            ctx.timer_service().register_event_time_timer(min(later))
        for s in samples:
            yield sample_to_row(s)
