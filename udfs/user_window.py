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

Timers. With ``one_timer_per_user`` (the default job; not in deterministic mode) a user has
one pending timer, at the end of their earliest pending window, and its firing applies every
window the watermark has passed, one ``advance_user`` call per window in window order (the
same history and samples as one firing per window). Its samples carry the firing's
timestamp, not each window's end. While a backlog is read the watermark moves in jumps and a
user has several windows pending (sessions of events seconds apart): a timer per window made
registering and firing timers the largest cost of this stage (a registration goes through
PyFlink's timer coder: ~40% of the worker's CPU in a profile); one per user registers ~8x
fewer on the synthetic stream, and the job used ~31% less CPU per event (README).
Deterministic mode keeps one timer per window: its trainer orders samples by their record
timestamp, the window's end.
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
        one_timer_per_user: bool = False,
    ) -> None:
        """``earlier_layout``: whether state written by earlier releases may be restored
        (the job starts from a savepoint or retained checkpoint). Without it a user's first
        touch reads one state from the JVM instead of two. ``one_timer_per_user``: see the
        module docstring (False = one timer per window)."""
        self.cfg = cfg
        self.history_length = history_length
        self.model_key = model_key
        self.window_ms = window_ms
        self.late_tag = late_tag
        self.earlier_layout = earlier_layout
        self.one_timer_per_user = one_timer_per_user

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

    def process_element(self, value, ctx):
        ts = ctx.timestamp()
        last_ms = self._last_ms(ts)
        if last_ms <= ctx.timer_service().current_watermark():
            yield self.late_tag, value
            return
        state = self._load()
        pending = state[1]
        # Register only when no pending timer fires at or before this window yet: with one
        # timer per user, any pending window ends at or before a timer that is still to
        # fire (on_timer keeps it so); with one per window, only the same window's does.
        if self.one_timer_per_user:
            covered = any(self._last_ms(t) <= last_ms for t, _ in pending)
        else:
            covered = any(self._last_ms(t) == last_ms for t, _ in pending)
        pending.append((ts, value))
        self.user.update(state)
        if not covered:
            ctx.timer_service().register_event_time_timer(last_ms)

    def on_timer(self, timestamp, ctx):
        history, pending = self._load()
        due_by = timestamp
        if self.one_timer_per_user:
            # Every window the watermark has passed is due, not only this timer's.
            due_by = max(timestamp, ctx.timer_service().current_watermark())
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
        if self.one_timer_per_user and rest:
            # The user's next timer (registering one that exists already is a no-op).
            ctx.timer_service().register_event_time_timer(min(self._last_ms(t) for t, _ in rest))
        for s in samples:
            yield sample_to_row(s)
