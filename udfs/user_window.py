"""Closed windows of a user's events -> per-user history in keyed state -> samples.

The windows are Flink's own (``flink_job.operators.windows_by_field``): tumbling event-time
windows of ``job.window_ms`` per user, kept in the JVM by Flink's window operator, which
passes each closed window to :class:`UserWindows` as one element ``(user, [event row, ...])``
(arrival order) with the window's last millisecond as its timestamp, and sends an event
whose window the watermark has passed to its late side output (the DLQ).

So this stage's Python does one thing per window: one :func:`models.history.advance_user`
call, one state write, the window's samples emitted with the window's timestamp. Earlier
releases buffered the events here, in keyed state with a Python event-time timer per
window; registering and firing those timers (PyFlink encodes each through its row coder)
and rewriting the buffer per event were most of this stage's CPU (README "Optimisations",
sixteenth round). A savepoint of such a release still restores: its buffered events are
applied before the first window after them, or by their own timers (:meth:`on_timer`).
"""

from __future__ import annotations

import pickle

from pyflink.common import Time, Types
from pyflink.datastream import KeyedProcessFunction
from pyflink.datastream.state import ListStateDescriptor, StateTtlConfig, ValueStateDescriptor

from models.config import UserStageConfig
from models.history import advance_user
from udfs.malloc import keep_large_blocks
from udfs.records import EVENT_TYPE, row_to_event, sample_to_row


class UserWindows(KeyedProcessFunction):
    """Per-user history: applies each closed window of a user's events to the user's state
    and emits one sample per event (keyed by user, after ``windows_by_field``)."""

    def __init__(
        self,
        cfg: UserStageConfig,
        history_length: int,
        model_key: str,
        window_ms: int,
        earlier_layout: bool = True,
        malloc_thresholds: bool = True,
    ) -> None:
        """``earlier_layout``: whether state written by earlier releases may be restored
        (the job starts from a savepoint or retained checkpoint). Without it a user's first
        touch reads one state from the JVM instead of two. ``window_ms``: the windows'
        length, to place events buffered by an earlier release in their windows.
        ``malloc_thresholds``: ``job.malloc_thresholds`` (udfs/malloc.py)."""
        self.cfg = cfg
        self.history_length = history_length
        self.model_key = model_key
        self.window_ms = window_ms
        self.earlier_layout = earlier_layout
        self.malloc_thresholds = malloc_thresholds

    def open(self, runtime_context):
        if self.malloc_thresholds:
            keep_large_blocks()
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
        # One value per user: [history, pending], kept as the Python object (pickled when
        # the bundle commits), so the state cache answers every read after a user's first.
        # pending = (record timestamp, event row) that an earlier release buffered here
        # before its windows closed; this release leaves it empty.
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

    def _advance(self, history, windows: dict[int, list]) -> tuple[object, list]:
        """Apply ``windows`` (last millisecond -> event rows) in window order."""
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
        return history, samples

    def _split_pending(self, pending: list, due_by: int) -> tuple[dict[int, list], list]:
        """Buffered events of an earlier release: (windows ending <= ``due_by``, the rest)."""
        windows: dict[int, list] = {}
        rest = []
        for ts, row in pending:
            last_ms = self._last_ms(ts)
            if last_ms <= due_by:
                windows.setdefault(last_ms, []).append(row)
            else:
                rest.append((ts, row))
        return windows, rest

    def process_element(self, value, ctx):
        last_ms = ctx.timestamp()  # the window's last millisecond
        history, pending = self._load()
        windows: dict[int, list] = {}
        if pending:
            # Events an earlier release buffered: their windows up to this one come first
            # (they arrived before this window's events, which join the same window).
            windows, pending = self._split_pending(pending, last_ms)
        windows.setdefault(last_ms, []).extend(value[1])
        history, samples = self._advance(history, windows)
        self.user.update([history, pending])
        for s in samples:
            yield sample_to_row(s)

    def on_timer(self, timestamp, ctx):
        """Only timers of an earlier release's buffered events (restored from its state)."""
        history, pending = self._load()
        due_by = max(timestamp, ctx.timer_service().current_watermark())
        windows, rest = self._split_pending(pending, due_by)
        history, samples = self._advance(history, windows)
        self.user.update([history, rest])
        if rest:  # that release kept one timer per span of windows, not per window
            ctx.timer_service().register_event_time_timer(min(self._last_ms(t) for t, _ in rest))
        for s in samples:
            yield sample_to_row(s)
