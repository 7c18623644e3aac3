"""The user-history function against in-memory keyed state (no JVM): closed windows in,
samples out, and its state layout."""

import pytest

from models.config import UserStageConfig
from models.events import Event
from models.history import USER_STATE_FORMAT, Sample, UserState, advance_user
from models.state_format import StateFormatError
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


class Context:
    """One key's runtime context, timer service and element context at once."""

    def __init__(self, user=None) -> None:
        self.state = Value(user)
        self.ts, self.timers, self.watermark = 0, [], -(2**63)

    def get_state(self, descriptor):
        assert descriptor.name == "user"
        return self.state

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


def windows(ctx: Context) -> UserWindows:
    fn = UserWindows(UserStageConfig(), 5, "m")
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
    # The user's value is the history itself, no buffered events.
    history = ctx.state.value()
    assert isinstance(history, UserState) and history.history == ["i0", "i1", "i2"]
    assert ctx.timers == []  # the windows are the JVM's: no Python timer


def test_user_state_of_an_unknown_format_stops_the_stage_with_what_to_do():
    st, _ = advance_user(None, [], UserStageConfig(), 5, "m")
    st.format = USER_STATE_FORMAT + 1
    ctx = Context(st)
    fn = windows(ctx)
    with pytest.raises(StateFormatError, match=r"user history state has state format 3.*newer"):
        close(fn, ctx, [event(0, "i0", 100)])


def test_sample_rows_round_trip_the_context_and_its_absence():
    from udfs.records import row_to_sample, sample_to_row

    same = Sample("m", "u", ("a", "b"), "c", 1, 1.0, 5, "e1")
    other = Sample("m", "u", ("a",), "c", 1, 1.0, 5, "e2", ("a", "low"))
    for s in (same, other):
        assert row_to_sample(sample_to_row(s)) == s
    assert sample_to_row(same)[8] == ""  # the history is not sent twice
    assert row_to_sample(sample_to_row(same)).events == ("a", "b")
