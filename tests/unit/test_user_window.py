"""The user-window function against in-memory keyed state (no JVM): its state layout, and
state written by earlier releases."""

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


def windows(ctx: Context, earlier_layout: bool = True, span_ms: int = 0) -> UserWindows:
    fn = UserWindows(UserStageConfig(), 5, "m", WINDOW_MS, None, earlier_layout, span_ms)
    fn.open(ctx)
    return fn


def test_pending_events_wait_beside_the_history_in_one_value():
    ctx = Context()
    fn = windows(ctx)
    for i, ts in enumerate((100, 900, 1500)):
        ctx.ts = ts
        assert list(fn.process_element(event(i, f"i{i}", ts), ctx)) == []
    assert ctx.timers == [999, 1999]  # one per window: the second event's exists already
    history, pending = ctx.state.value()
    assert history is None and [ts for ts, _ in pending] == [100, 900, 1500]

    samples = list(fn.on_timer(999, ctx))
    assert [(s[3], s[1]) for s in samples] == [("i0", "u1"), ("i1", "u1")]  # (target, user)
    history, pending = ctx.state.value()
    assert [ts for ts, _ in pending] == [1500]
    assert [s[3] for s in fn.on_timer(1999, ctx)] == ["i2"]
    assert ctx.state.value()[1] == []
    # Only a user's first touch looks for state of an earlier release.
    assert ctx.pending.reads == 1


def test_state_of_the_earlier_layout_is_moved_over_without_losing_an_event():
    """Before: the history pickled as bytes in "user", pending events in a list state."""
    history, _ = advance_user(
        None, [Event("e0", "u1", "i0", "click", 50)], UserStageConfig(), 5, "m"
    )
    ctx = Context(pickle.dumps(history), [(1200, event(1, "i1", 1200))])
    fn = windows(ctx)
    ctx.ts = 1300
    list(fn.process_element(event(2, "i2", 1300), ctx))
    assert ctx.pending.rows == []  # moved into the user's value
    samples = list(fn.on_timer(1999, ctx))
    assert [s[3] for s in samples] == ["i1", "i2"]
    assert samples[0][2].split("\x1f") == ["i0"]  # the earlier history carried over
    assert samples[1][2].split("\x1f") == ["i0", "i1"]


def test_without_a_restore_a_new_user_reads_only_its_own_value():
    """A job that did not start from a savepoint never wrote the earlier layout: a new
    user's first touch skips that list (one blocking read from the JVM instead of two)
    and the windows give the same samples."""
    runs = {}
    for earlier in (True, False):
        ctx = Context()
        fn = windows(ctx, earlier_layout=earlier)
        for i, ts in enumerate((100, 900, 1500)):
            ctx.ts = ts
            list(fn.process_element(event(i, f"i{i}", ts), ctx))
        runs[earlier] = [*fn.on_timer(999, ctx), *fn.on_timer(1999, ctx)], ctx.pending.reads
    assert runs[False][0] == runs[True][0] and len(runs[False][0]) == 3
    assert (runs[True][1], runs[False][1]) == (1, 0)


def feed(fn: UserWindows, ctx: Context, stamps) -> None:
    for i, ts in enumerate(stamps):
        ctx.ts = ts
        assert list(fn.process_element(event(i, f"i{i}", ts), ctx)) == []


def advance(fn: UserWindows, ctx: Context, watermark: int, fired: set[int]) -> list:
    """What Flink does when the watermark advances: fire every registered timer up to it,
    in time order. A timer registered during a firing must be after the watermark (one at
    or before it would wait for the next watermark, and after the last one, forever)."""
    ctx.watermark = watermark
    out = []
    for t in sorted(set(ctx.timers) - fired):
        if t <= watermark:
            fired.add(t)
            before = len(ctx.timers)
            out += list(fn.on_timer(t, ctx))
            assert all(new > watermark for new in ctx.timers[before:])
    return out


def test_a_timer_fires_every_window_of_its_span_the_watermark_passed():
    ctx, fired = Context(), set()
    fn = windows(ctx, span_ms=5000)
    feed(fn, ctx, (100, 1500, 2500, 1600))
    assert ctx.timers == [999]  # later windows of the span are covered by the earliest's
    samples = advance(fn, ctx, 2200, fired)  # a backlog: the watermark passed two windows
    assert [s[3] for s in samples] == ["i0", "i1", "i3"]
    assert [s[2] for s in samples] == ["", "i0", "i0\x1fi1"]  # histories, window by window
    assert [ts for ts, _ in ctx.state.value()[1]] == [2500]
    assert ctx.timers == [999, 2999]  # the span's next pending window
    assert [s[3] for s in advance(fn, ctx, 2**63 - 1, fired)] == ["i2"]
    assert ctx.state.value()[1] == []


def test_a_window_of_the_next_span_waits_for_its_own_timer():
    """Samples leave in event-time order up to the span: a user's window of a later span
    is not pulled ahead of other users' windows before it."""
    ctx = Context()
    fn = windows(ctx, span_ms=2000)
    feed(fn, ctx, (100, 1500, 2500))
    assert ctx.timers == [999, 2999]
    ctx.watermark = 2**63 - 1
    assert [s[3] for s in fn.on_timer(999, ctx)] == ["i0", "i1"]
    assert [ts for ts, _ in ctx.state.value()[1]] == [2500]
    assert ctx.timers == [999, 2999]  # nothing new: 2999 has its timer
    assert [s[3] for s in fn.on_timer(2999, ctx)] == ["i2"]


def test_an_earlier_window_arriving_late_gets_its_own_timer():
    ctx, fired = Context(), set()
    fn = windows(ctx, span_ms=5000)
    feed(fn, ctx, (1500, 300))  # out of order, within the watermark's bound
    assert ctx.timers == [1999, 999]
    assert [s[3] for s in advance(fn, ctx, 999, fired)] == ["i1"]  # only the closed window
    assert [ts for ts, _ in ctx.state.value()[1]] == [1500]
    assert [s[3] for s in advance(fn, ctx, 1999, fired)] == ["i0"]
    assert ctx.state.value()[1] == []


def test_a_span_gives_the_samples_of_one_timer_per_window():
    stamps = (100, 900, 1500, 2100, 2200, 3900, 5000, 5001, 7300)
    runs = {}
    for span in (0, 5000, 10**9):
        ctx, fired = Context(), set()
        fn = windows(ctx, span_ms=span)
        feed(fn, ctx, stamps)
        samples = []
        for wm in (2500, 6200, 2**63 - 1):  # the watermark jumps
            samples += advance(fn, ctx, wm, fired)
        runs[span] = samples, len(set(ctx.timers))
    assert len(runs[0][0]) == len(stamps)
    assert runs[5000][0] == runs[0][0] and runs[10**9][0] == runs[0][0]
    assert (runs[0][1], runs[5000][1], runs[10**9][1]) == (6, 4, 3)  # timers
