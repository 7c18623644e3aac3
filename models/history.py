"""Per-user stage logic: keep each user's recent history and turn events into samples.

Pure functions over a small :class:`UserState`; the Flink window function stores the
state in keyed state and calls :func:`advance_user` once per fired window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from models.config import UserStageConfig
from models.events import Event
from models.state_format import format_error

# 2: ``context`` (every event's item, any label) next to the positives' ``history``.
USER_STATE_FORMAT = 2


@dataclass
class UserState:
    """What the job remembers per user. ``history`` (positives) and ``context`` (every
    event's item, whatever its label) are oldest -> newest item ids."""

    history: list[str] = field(default_factory=list)
    context: list[str] = field(default_factory=list)
    recent_event_ids: list[str] = field(default_factory=list)
    events: int = 0
    duplicates: int = 0
    last_ts: int = 0
    format: int = USER_STATE_FORMAT
    # A forget request (:func:`forget`) at this event time (ms): the user's events up to it
    # that reach the stage afterwards (still in open windows then) are dropped. -1 = none.
    # (State of format 2 without it reads the class default.)
    forgotten_before: int = -1


def rate_limited(events: list[Event], limit: int) -> tuple[list[Event], list[Event]]:
    """(kept, excess): the first ``limit`` of one user's window of events in (ts, event_id)
    order, and the rest (``limit`` 0 = no limit)."""
    if limit <= 0 or len(events) <= limit:
        return events, []
    ordered = sorted(events, key=lambda x: (x.ts, x.event_id))
    return ordered[:limit], ordered[limit:]


RATE_LIMIT_REASON = (
    "user rate limit: more than user.max_events_per_window events of this user in one "
    "job.window_ms window; not learned from"
)


def forget(ts: int) -> UserState:
    """The state of a user whose data was deleted at event time ``ts`` on request: nothing
    of them, only the time, so that their events up to it still in flight are dropped
    and their later events start a new user."""
    return UserState(forgotten_before=ts)


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: the user's history before ``target`` (oldest -> newest).

    label 1 = positive interaction the model should rank high; label 0 = an event that
    is counted but not learned from as a positive (e.g. a low rating). ``context`` is the
    user's items before ``target`` whatever their label (oldest -> newest): a low rating
    still says what the user chose to consume, which predicts what comes next. Which of
    the two the model reads is ``model.history_source``; a sample built without a
    context (None) has its history as context.
    """

    model_key: str
    user_id: str
    history: tuple[str, ...]
    target: str
    label: int
    weight: float
    ts: int
    event_id: str
    context: tuple[str, ...] | None = None

    @property
    def events(self) -> tuple[str, ...]:
        """The context, or the history when the sample has none."""
        return self.history if self.context is None else self.context


def label_and_weight(e: Event, cfg: UserStageConfig) -> tuple[int, float]:
    base = cfg.weights.get(e.type, 1.0)
    if e.type == "rating":
        v = e.value if e.value is not None else 0.0
        if v >= cfg.min_positive_rating:
            return 1, base * v / 5.0
        return 0, 0.0
    return 1, base


def advance_user(
    state: UserState | None,
    events: list[Event],
    cfg: UserStageConfig,
    history_length: int,
    model_key: str,
) -> tuple[UserState, list[Sample]]:
    """Apply one window of a user's events, in (ts, event_id) order.

    A sample's history is the user's last ``keep = max(cfg.known_items, history_length)``
    positives and its context the items of the user's last ``keep`` events of any label:
    the towers read the newest ``history_length`` of one of them, ranking excludes all.

    Duplicates (same event_id seen in the last ``cfg.dedup_size`` events) are dropped and
    counted, and so are events up to a forget request's time (``forgotten_before``);
    every other event yields exactly one Sample. Positives extend the history.
    """
    st = state if state is not None else UserState()
    if st.format == 1:
        # Format 1 kept positives only: they are the best context there is.
        st.context = list(st.history)
        st.format = USER_STATE_FORMAT
    if st.format != USER_STATE_FORMAT:
        raise format_error("user history state", st.format, USER_STATE_FORMAT)
    keep = max(cfg.known_items, history_length)
    seen = set(st.recent_event_ids)
    samples: list[Sample] = []
    for e in sorted(events, key=lambda x: (x.ts, x.event_id)):
        if e.ts <= st.forgotten_before:
            continue
        if e.event_id in seen:
            st.duplicates += 1
            continue
        seen.add(e.event_id)
        st.recent_event_ids.append(e.event_id)
        label, weight = label_and_weight(e, cfg)
        hist, ctx = tuple(st.history[-keep:]), tuple(st.context[-keep:])
        samples.append(
            Sample(
                model_key=model_key,
                user_id=e.user_id,
                history=hist,
                target=e.item_id,
                label=label,
                weight=weight,
                ts=e.ts,
                event_id=e.event_id,
                # None when the two agree (no label-0 events): nothing is carried twice.
                context=None if ctx == hist else ctx,
            )
        )
        st.events += 1
        st.last_ts = max(st.last_ts, e.ts)
        st.context.append(e.item_id)
        del st.context[:-keep]
        if label == 1:
            st.history.append(e.item_id)
            del st.history[:-keep]
    del st.recent_event_ids[: -cfg.dedup_size]
    return st, samples
