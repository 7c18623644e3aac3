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
