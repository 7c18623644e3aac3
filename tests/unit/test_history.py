from models.config import UserStageConfig
from models.events import Event
from models.history import advance_user


def ev(i, item, ts, etype="click", value=None):
    return Event(f"e{i}", "u", item, etype, ts, value)


def test_one_sample_per_event_in_time_order_with_bounded_history():
    cfg = UserStageConfig(known_items=0)  # raised to history_length
    events = [ev(i, f"i{i}", 1000 - i) for i in range(5)]  # arrive in reverse time order
    st, samples = advance_user(None, events, cfg, history_length=3, model_key="m")
    assert [s.target for s in samples] == ["i4", "i3", "i2", "i1", "i0"]
    assert samples[0].history == ()
    assert samples[4].history == ("i3", "i2", "i1")  # last 3, oldest -> newest
    assert st.history == ["i2", "i1", "i0"]
    assert st.events == 5 and all(s.model_key == "m" for s in samples)


def test_duplicates_are_dropped_across_windows():
    cfg = UserStageConfig(dedup_size=10)
    st, s1 = advance_user(None, [ev(1, "a", 1), ev(2, "b", 2)], cfg, 5, "m")
    st, s2 = advance_user(st, [ev(2, "b", 2), ev(3, "c", 3)], cfg, 5, "m")
    assert [s.target for s in s1 + s2] == ["a", "b", "c"]
    assert st.duplicates == 1


def test_low_ratings_are_label_zero_and_not_in_history():
    cfg = UserStageConfig(min_positive_rating=3.5)
    st, samples = advance_user(
        None, [ev(1, "a", 1, "rating", 2.0), ev(2, "b", 2, "rating", 5.0)], cfg, 5, "m"
    )
    assert [(s.target, s.label) for s in samples] == [("a", 0), ("b", 1)]
    assert samples[1].weight == 1.0
    assert st.history == ["b"]


def test_known_history_is_longer_than_what_the_towers_read():
    """Samples carry the last known_items positives (ranking excludes them all)."""
    cfg = UserStageConfig(known_items=4)
    events = [ev(i, f"i{i}", i) for i in range(7)]
    st, samples = advance_user(None, events, cfg, history_length=2, model_key="m")
    assert samples[6].history == ("i2", "i3", "i4", "i5")
    assert st.history == ["i3", "i4", "i5", "i6"]


def test_context_holds_every_event_and_history_only_positives():
    """A low rating is context (the user chose the item) but never a positive."""
    cfg = UserStageConfig(known_items=3, min_positive_rating=3.5)
    events = [
        ev(1, "a", 1, "rating", 5.0),
        ev(2, "b", 2, "rating", 1.0),
        ev(3, "c", 3, "rating", 4.0),
        ev(4, "d", 4, "rating", 2.0),
        ev(5, "e", 5, "rating", 5.0),
    ]
    st, samples = advance_user(None, events, cfg, history_length=2, model_key="m")
    assert samples[4].history == ("a", "c") and samples[4].context == ("b", "c", "d")
    assert samples[0].context is None and samples[0].events == ()
    # Where every event so far was positive the context is the history: not carried twice.
    assert samples[1].context is None and samples[1].events == samples[1].history == ("a",)
    assert samples[2].context == ("a", "b") and samples[2].events == ("a", "b")
    assert st.context == ["c", "d", "e"] and st.history == ["a", "c", "e"]


def test_a_forgotten_user_keeps_nothing_and_starts_afresh():
    from models.history import forget

    cfg = UserStageConfig()
    st, _ = advance_user(None, [ev(i, f"i{i}", 100 + i) for i in range(5)], cfg, 4, "m")
    assert st.history
    st = forget(110)
    assert (st.history, st.context, st.recent_event_ids, st.events) == ([], [], [], 0)
    # Events up to the request still in flight are dropped; later ones start a new user.
    st, samples = advance_user(st, [ev(9, "old", 105), ev(10, "new", 120)], cfg, 4, "m")
    assert [s.target for s in samples] == ["new"] and samples[0].history == ()
    assert st.history == ["new"] and st.forgotten_before == 110


def test_rate_limit_keeps_the_first_events_of_a_window():
    from models.history import rate_limited

    events = [ev(i, f"i{i}", 100 + (i % 3)) for i in range(7)]
    kept, excess = rate_limited(events, 4)
    order = sorted(events, key=lambda e: (e.ts, e.event_id))
    assert kept == order[:4] and excess == order[4:]
    assert rate_limited(events, 0) == (events, [])
    assert rate_limited(events, 7) == (events, [])
