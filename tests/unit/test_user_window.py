"""The user-history function against in-memory keyed state (no JVM): closed windows in,
samples out, its state layout, and state written by earlier releases (which buffered
events here, with a timer per window or per span of windows)."""

import pickle

from models.config import UserStageConfig
from models.events import Event
from models.history import advance_user
from udfs.records import event_to_row
from udfs.user_window import UserWindows

WINDOW_MS = 1000


class Value:
    def __init__(self, v=None) -> None:
        self.v = v

    def value(self):
        return self.v

    def update(self, v) -> None:
        self.v = v


class ListOf:
    def __init__(self, rows=()) -> None:
        self.rows = list(rows)
        self.reads = 0

    def get(self):
        self.reads += 1
        return iter(list(self.rows))

    def clear(self) -> None:
        self.rows = []


class Context:
    """One key's runtime context, timer service and element context at once."""

    def __init__(self, user=None, pending=()) -> None:
        self.state, self.pending = Value(user), ListOf(pending)
        self.ts, self.timers, self.watermark = 0, [], -(2**63)

    def get_state(self, descriptor):
        assert descriptor.name == "user"
        return self.state

    def get_list_state(self, descriptor):
        assert descriptor.name == "pending"
        return self.pending

    def timestamp(self):
        return self.ts

    def timer_service(self):
        return self

    def current_watermark(self):
        return self.watermark

    def register_event_time_timer(self, t):
        self.timers.append(t)


def event(i: int, item: str, ts: int) -> tuple:
    return event_to_row(Event(f"e{i}", "u1", item, "click", ts))


def last_ms(ts: int) -> int:
    return ts - ts % WINDOW_MS + WINDOW_MS - 1


def windows(ctx: Context, earlier_layout: bool = True) -> UserWindows:
    fn = UserWindows(UserStageConfig(), 5, "m", WINDOW_MS, earlier_layout)
    fn.open(ctx)
    return fn


def close(fn: UserWindows, ctx: Context, rows: list[tuple]) -> list:
    """What Flink's window operator hands on for one closed window of ``rows``."""
    ctx.ts = last_ms(rows[0][4])
    return list(fn.process_element(("u1", rows), ctx))


def test_a_closed_window_is_applied_in_one_step_and_only_the_history_is_kept():
    ctx = Context()
    fn = windows(ctx)
    samples = close(fn, ctx, [event(0, "i0", 100), event(1, "i1", 900)])
    # One advance_user call for the window: both samples see the history before it.
    want = advance_user(
        None,
        [Event("e0", "u1", "i0", "click", 100), Event("e1", "u1", "i1", "click", 900)],
        UserStageConfig(), 5, "m",
    )[1]  # fmt: skip
    assert [(s[3], s[2]) for s in samples] == [(w.target, "\x1f".join(w.history)) for w in want]
    samples = close(fn, ctx, [event(2, "i2", 1500)])
    assert [(s[3], s[2].split("\x1f")) for s in samples] == [("i2", ["i0", "i1"])]
    history, pending = ctx.state.value()
    assert history is not None and pending == []
    assert ctx.timers == []  # the windows are the JVM's: no Python timer
    # Only a user's first touch looks for state of an earlier release.
    assert ctx.pending.reads == 1


def test_state_of_the_earlier_layout_is_moved_over_without_losing_an_event():
    """Two releases back: the history pickled as bytes in "user", pending events in a list
    state. Its events join the window they belong to, before the window's new events."""
    history, _ = advance_user(
        None, [Event("e0", "u1", "i0", "click", 50)], UserStageConfig(), 5, "m"
    )
    ctx = Context(pickle.dumps(history), [(1200, event(1, "i1", 1200))])
    fn = windows(ctx)
    samples = close(fn, ctx, [event(2, "i2", 1300)])
    assert ctx.pending.rows == []  # moved into the user's value
    assert [s[3] for s in samples] == ["i1", "i2"]
    assert samples[0][2].split("\x1f") == ["i0"]  # the earlier history carried over
    assert ctx.state.value()[1] == []


def test_events_buffered_by_the_previous_release_keep_their_window_order():
    """The previous release kept [history, pending] in "user" and a timer per span: after a
    restore its earlier windows come before a new window, its later ones wait for it."""
    ctx = Context([None, [(400, event(0, "i0", 400)), (2600, event(1, "i1", 2600))]])
    fn = windows(ctx)
    samples = close(fn, ctx, [event(2, "i2", 1100)])
    assert [(s[3], s[2]) for s in samples] == [("i0", ""), ("i2", "i0")]
    assert [ts for ts, _ in ctx.state.value()[1]] == [2600]
    # Its restored timer (the span's, at 999, fired late) applies what the watermark passed
    # and re-arms for the rest.
    ctx.watermark = 1999
    assert list(fn.on_timer(999, ctx)) == []
    assert ctx.timers == [2999]
    ctx.watermark = 2999
    assert [(s[3], s[2]) for s in fn.on_timer(2999, ctx)] == [("i1", "i0\x1fi2")]
    assert ctx.state.value()[1] == [] and ctx.timers == [2999]


def test_without_a_restore_a_new_user_reads_only_its_own_value():
    """A job that did not start from a savepoint never wrote the earlier layout: a new
    user's first touch skips that list (one blocking read from the JVM instead of two)
    and the windows give the same samples."""
    runs = {}
    for earlier in (True, False):
        ctx = Context()
        fn = windows(ctx, earlier_layout=earlier)
        out = close(fn, ctx, [event(0, "i0", 100), event(1, "i1", 900)])
        out += close(fn, ctx, [event(2, "i2", 1500)])
        runs[earlier] = out, ctx.pending.reads
    assert runs[False][0] == runs[True][0] and len(runs[False][0]) == 3
    assert (runs[True][1], runs[False][1]) == (1, 0)
