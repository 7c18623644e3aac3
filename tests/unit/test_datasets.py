import json

from flink_job.config import ReplayConfig
from models.events import InvalidRecord, parse_event, parse_item
from replay.datasets import ReplayStats, movielens, synthetic


def test_synthetic_stream_counts_and_validity():
    cfg = ReplayConfig(num_users=50, num_items=80, num_events=1000, new_items_midstream=10)
    st = ReplayStats()
    recs = list(synthetic(cfg, st))
    events = [r for r in recs if r.topic == "events"]
    assert st.events == 1000 and st.malformed == 10 and st.items == 80
    good = bad = 0
    for r in events:
        try:
            parse_event(r.value)
            good += 1
            assert r.valid
        except InvalidRecord:
            bad += 1
            assert not r.valid
    assert (good, bad) == (1000, 10)
    ts = [json.loads(r.value)["ts"] for r in events if r.valid]
    assert ts == sorted(ts)


def test_new_items_appear_in_catalogue_before_their_events():
    cfg = ReplayConfig(num_users=30, num_items=60, num_events=2000, new_items_midstream=10)
    seen_catalogue, late = set(), []
    for r in synthetic(cfg):
        if r.topic == "items":
            seen_catalogue.add(parse_item(r.value).item_id)
        elif r.valid:
            item = parse_event(r.value).item_id
            if item not in seen_catalogue:
                late.append(item)
    assert not late
    assert {f"item{n}" for n in range(50, 60)} <= seen_catalogue


def test_synthetic_is_deterministic_per_seed():
    cfg = ReplayConfig(num_events=300)
    assert [r.value for r in synthetic(cfg)] == [r.value for r in synthetic(cfg)]


def test_movielens_loader(tmp_path):
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,10,4.0,964982703\n2,20,2.5,964981247\n1,20,5.0,964982224\n"
    )
    (tmp_path / "movies.csv").write_text(
        'movieId,title,genres\n10,"Heat (1995)",Action|Crime\n'
        "20,Toy Story (1995),(no genres listed)\n"
    )
    st = ReplayStats()
    recs = list(movielens(tmp_path, stats=st))
    items = [parse_item(r.value) for r in recs if r.topic == "items"]
    events = [parse_event(r.value) for r in recs if r.topic == "events"]
    assert [i.categories for i in items] == [("Action", "Crime"), ()]
    assert [(e.user_id, e.item_id, e.value) for e in events] == [
        ("2", "20", 2.5),
        ("1", "20", 5.0),
        ("1", "10", 4.0),
    ]
    assert events[0].ts == 964981247000 and all(e.type == "rating" for e in events)
    assert st.histories["1"] == ["20", "10"]


def _bursty_movielens(d):
    """A MovieLens-format directory whose users rate in same-second bursts, listed in
    movieId order as the real files are."""
    import random

    rng = random.Random(3)
    rows = ["userId,movieId,rating,timestamp"]
    for u in range(40):
        for burst in range(4):
            ts = 964_900_000 + 1000 * burst + u
            for m in sorted(rng.sample(range(1, 80), 6)):
                rows.append(f"{u},{m},{rng.choice([2.0, 3.5, 4.0, 5.0])},{ts}")
    (d / "ratings.csv").write_text("\n".join(rows) + "\n")
    movies = ["movieId,title,genres"] + [f"{m},Movie {m} (1995),Drama" for m in range(1, 80)]
    (d / "movies.csv").write_text("\n".join(movies) + "\n")
    return d


def _guard_stream(tmp_path, **replay):
    from dataclasses import replace

    from flink_job.config import load_config
    from offline.stream import to_stream
    from replay.datasets import records

    d = tmp_path / "ml"
    if not d.exists():
        d.mkdir()
        _bursty_movielens(d)
    cfg = load_config(None, [f"replay.dataset='{d}'"])
    cfg = replace(cfg, replay=replace(cfg.replay, **replay))
    recs = list(records(cfg.replay))
    return cfg, recs, list(to_stream(iter(recs), cfg))


def test_permute_ids_is_a_consistent_bijection_and_leaves_the_rest_alone(tmp_path):
    _, plain, _ = _guard_stream(tmp_path)
    _, perm, _ = _guard_stream(tmp_path, permute_ids=True)
    assert len(plain) == len(perm)
    mapping: dict[str, str] = {}
    for a, b in zip(plain, perm, strict=True):
        assert (a.topic, a.ts, a.valid) == (b.topic, b.ts, b.valid)
        if not a.valid:
            assert a.value == b.value  # hostile records pass unchanged
            continue
        ja, jb = json.loads(a.value), json.loads(b.value)
        old, new = str(ja.pop("item_id")), str(jb.pop("item_id"))
        assert mapping.setdefault(old, new) == new  # one item, one new id everywhere
        if a.topic == "events":
            # "ml-<user>-<movie>-<ts>" becomes an opaque hash.
            assert ja.pop("event_id").startswith("ml-")
            assert not jb.pop("event_id").startswith("ml-")
        assert ja == jb  # users, types, times, values and texts are untouched
    assert len(set(mapping.values())) == len(mapping)  # a bijection
    assert not set(mapping) & set(mapping.values())


def test_shuffle_ties_reorders_only_within_equal_timestamps(tmp_path):
    _, plain, _ = _guard_stream(tmp_path)
    _, shuf, _ = _guard_stream(tmp_path, shuffle_ties=True)

    def events(recs):
        out = []
        for r in recs:
            if r.topic == "events" and r.valid:
                j = json.loads(r.value)
                out.append((j.pop("ts"), j.pop("event_id"), json.dumps(j, sort_keys=True)))
        return out

    a, b = events(plain), events(shuf)
    assert [t for t, _, _ in a] == [t for t, _, _ in b]  # timestamps keep their order
    assert sorted((t, x) for t, _, x in a) == sorted((t, x) for t, _, x in b)
    assert [x for _, _, x in a] != [x for _, _, x in b]  # some run was reordered
    ids = [e for _, e, _ in b]
    assert ids == sorted(ids)  # (ts, event_id) order = the shuffled order


def test_a_counting_baseline_ranks_the_same_under_permuted_ids(tmp_path):
    """The guard itself: nothing in a baseline's ranks may depend on how items are named."""
    from models.baselines import WindowedCoOccurrence, positives
    from models.history import Sample

    runs = []
    for permute in (False, True):
        _, _, stream = _guard_stream(tmp_path, permute_ids=permute)
        m, ranks = WindowedCoOccurrence(), []
        for x in stream:
            if isinstance(x, Sample):
                if positives([x]):
                    ranks += m.rank_targets([x])
                m.learn([x])
            else:
                m.ingest_items([x])
        runs.append(ranks)
    assert runs[0] == runs[1] and len(runs[0]) > 300
