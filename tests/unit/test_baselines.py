"""Baselines of `rtrec eval` (models.baselines) and the evaluation report (offline.evaluate)."""

import itertools
import json

import torch

from flink_job.config import load_config
from models.baselines import (
    ISGD,
    CoOccurrence,
    Popularity,
    RecentPopularity,
    SessionKNN,
    WindowedCoOccurrence,
)
from models.events import Item
from models.history import Sample
from models.trainer import OnlineLearner, new_meta
from offline.evaluate import learner_top_k, run_eval
from offline.stream import to_stream
from replay.datasets import synthetic
from tests.unit.helpers import topic_samples

_events = itertools.count()


def sample(user, history, target, label=1, weight=1.0):
    n = next(_events)
    return Sample("m", user, tuple(history), target, label, weight, 1000 + n, f"e{n}")


def items(*ids):
    return [Item(i, f"title {i}", "", (), 0) for i in ids]


def test_popularity_ranks_the_most_frequent_first():
    m = Popularity()
    m.ingest_items(items("a", "b", "c", "d"))
    m.learn([sample("u1", [], "c")] + [sample("u2", [], "a")] * 3 + [sample("u3", [], "b")] * 2)
    q = [sample("v", [], t) for t in ("a", "b", "c", "d")]
    # d has no positives: it ties with nothing else at 0 and comes last.
    assert m.rank_targets(q) == [1, 2, 3, 4]
    assert m.top_k([sample("v", [], "a")], 2) == [["a", "b"]]


def test_learning_uses_positives_only():
    m = Popularity()
    m.ingest_items(items("a", "b"))
    m.learn([sample("u", [], "a", label=0, weight=0.0), sample("u", [], "a", weight=0.0)])
    m.learn([sample("u", [], "b")])
    assert m.rank_targets([sample("v", [], "b"), sample("v", [], "a")]) == [1, 2]


def test_rank_semantics_history_unknown_and_ties():
    m = Popularity()
    m.ingest_items(items("a", "b", "c", "d"))
    # No positives yet: all four score 0; ties count against the target.
    assert m.rank_targets([sample("v", [], "a")]) == [4]
    m.learn([sample("u", [], "a")] * 5 + [sample("u", [], "b")] * 3 + [sample("u", [], "c")])
    # History items are not candidates: with "a" seen, "b" is first.
    assert m.rank_targets([sample("v", ["a"], "b")]) == [1]
    assert m.rank_targets([sample("v", ["a", "b"], "d")]) == [2]
    # An unknown target, or one in the history, is a miss: number of known items + 1.
    assert len(m) == 4
    assert m.rank_targets([sample("v", [], "zzz"), sample("v", ["b"], "b")]) == [5, 5]
    # Learning registers unseen targets and history items as known.
    m.learn([sample("u", ["h1"], "zzz")])
    assert len(m) == 6
    assert m.top_k([sample("v", ["a"], "b")], 3) == [["b", "c", "zzz"]]


def test_baselines_exclude_the_context_but_score_from_the_positives():
    m = WindowedCoOccurrence(window=1, decay=1.0)
    m.ingest_items(items("a", "b", "c", "d", "e"))
    m.learn([sample("u", ["a"], "b")] * 3 + [sample("u", ["a"], "c")] * 2)
    m.learn([sample("u", ["d"], "e")] * 2)

    def q(history, context, target):
        s = sample("v", history, target)
        return Sample(*[getattr(s, f) for f in ("model_key", "user_id", "history", "target",
                      "label", "weight", "ts", "event_id")], tuple(context))  # fmt: skip

    # C[a, b] = 3 > C[a, c] = 2: from history "a", b is first and c second...
    assert m.rank_targets([q(["a"], ["a"], "c")]) == [2]
    # ...unless b is in the context (say, rated low): then it is never a candidate.
    assert m.rank_targets([q(["a"], ["a", "b"], "c")]) == [1]
    assert m.rank_targets([q(["a"], ["a", "b"], "b")]) == [len(m) + 1]
    # Scores come from the history only: "d" in the context alone (C[d, e] = 2) leaves
    # popularity (b: 3 positives) to rank; in the history it puts e first.
    assert m.top_k([q([], ["d"], "x")], 1) == [["b"]]
    assert m.top_k([q(["d"], ["d"], "x")], 1) == [["e"]]


def test_recent_popularity_forgets_old_items():
    old = [sample("u", [], "old")] * 3
    new = [sample("u", [], "new")] * 2
    recent, alltime = RecentPopularity(window_events=2), Popularity()
    for m in (recent, alltime):
        m.ingest_items(items("old", "new", "other"))
        m.learn(old)
        m.learn(new)
    q = [sample("v", [], "old"), sample("v", [], "new")]
    assert alltime.rank_targets(q) == [1, 2]
    # "old" fell out of the 2-event window: it ties with "other" at 0, behind "new".
    assert recent.rank_targets(q) == [3, 1]
    assert recent.counts[recent.index["old"]] == 0


def test_cooccurrence_ranks_the_item_that_follows_first():
    m = CoOccurrence()
    m.ingest_items(items("h", "x", "next", "pop", "other"))
    stream = []
    for i in range(20):  # "pop" is the most popular item overall...
        stream.append(sample(f"p{i}", ["x"], "pop"))
    for i in range(5):  # ...but "next" always follows "h".
        stream.append(sample(f"u{i}", ["x", "h"], "next"))
    m.learn(stream)
    assert m.rank_targets([sample("v", ["h"], "next"), sample("v", ["h"], "pop")]) == [1, 2]
    # Without "h" in the last 5 items, popularity decides again.
    assert m.rank_targets([sample("v", ["h", "a", "b", "c", "d", "e"], "pop")]) == [1]
    # The most recent item weighs more than an older one.
    m.learn([sample(f"w{i}", ["other"], "x") for i in range(3)])
    assert m.top_k([sample("v", ["h", "other"], "x")], 1) == [["x"]]
    assert m.top_k([sample("v", ["other", "h"], "x")], 1) == [["next"]]


def test_cooccurrence_popularity_only_breaks_ties():
    m = CoOccurrence()
    m.ingest_items(items("h", "a", "b"))
    m.learn([sample("u", ["h"], "a")] + [sample(f"p{i}", [], "b") for i in range(1000)])
    assert m.rank_targets([sample("v", ["h"], "a"), sample("v", ["h"], "b")]) == [1, 2]


def ts_sample(user, history, target, ts):
    return Sample("m", user, tuple(history), target, 1, 1.0, ts, f"e{next(_events)}")


def test_windowed_cooccurrence_counts_both_directions_with_decay():
    m = WindowedCoOccurrence(window=3, decay=0.5)
    m.ingest_items(items("a", "b", "c", "d"))
    # The user's history before d is a, b, c (c newest): d pairs with c (1), b (0.5), a (0.25).
    m.learn([sample("u", ["a", "b", "c"], "d")])
    ix = m.index
    assert m.rows[ix["c"]][ix["d"]] == 1.0 and m.rows[ix["d"]][ix["c"]] == 1.0
    assert m.rows[ix["b"]][ix["d"]] == 0.5 and m.rows[ix["d"]][ix["b"]] == 0.5
    assert m.rows[ix["a"]][ix["d"]] == 0.25 and m.rows[ix["d"]][ix["a"]] == 0.25
    # Score of c for a history (d, b) (b newest) = 1 * C[b, c] + 0.5 * C[d, c] = 0 + 0.5.
    scores = m._scores([sample("v", ["d", "b"], "c")])[0]
    assert abs(scores[ix["c"]] - 0.5) < 1e-6
    # Symmetric: d is recommended after c although d never preceded c.
    assert m.top_k([sample("v", ["c"], "x")], 1) == [["d"]]
    # Pairs beyond the window are not counted.
    m2 = WindowedCoOccurrence(window=1)
    m2.ingest_items(items("a", "b", "c"))
    m2.learn([sample("u", ["a", "b"], "c")])
    assert m2.index["a"] not in m2.rows


def test_windowed_cooccurrence_popularity_only_breaks_ties():
    m = WindowedCoOccurrence()
    m.ingest_items(items("h", "a", "b"))
    m.learn([sample("u", ["h"], "a")] + [sample(f"p{i}", [], "b") for i in range(1000)])
    assert m.rank_targets([sample("v", ["h"], "a"), sample("v", ["h"], "b")]) == [1, 2]
    # The smallest possible score (one pair at the far end of the window, read at the far
    # end of the query's window: 0.7^18) still beats 1000 positives of popularity.
    far = WindowedCoOccurrence()
    far.ingest_items(items(*(f"f{i}" for i in range(10)), "t", "pop"))
    far.learn([sample("u", [f"f{i}" for i in range(10)], "t")])  # f0 is the oldest
    far.learn([sample(f"p{i}", [], "pop") for i in range(1000)])
    assert far.rank_targets([sample("v", ["f0"] + ["unknown"] * 9, "t")]) == [1]


def test_session_knn_recommends_what_similar_sessions_held():
    m = SessionKNN(gap_ms=1000, recent=3, neighbours=2)
    m.ingest_items(items("a", "b", "c", "d", "e", "pop"))
    gap = 10_000
    # Two past users had sessions {a, b, c}; one had {a, e}; then each a session {pop}.
    stream = []
    for u, sess in (("p1", "abc"), ("p2", "abc"), ("p3", "ae")):
        for j, it in enumerate(sess):
            stream.append(ts_sample(u, [], it, j))
        stream.append(ts_sample(u, [], "pop", gap))  # a later session closes the first
    stream += [ts_sample(f"q{i}", [], "pop", 0) for i in range(50)]
    m.learn(stream)
    assert len(m.sessions) == 6 + 50
    # The current user's session so far: a, b. The neighbours {a, b, c} vote for c.
    m.learn([ts_sample("v", [], "a", 5 * gap), ts_sample("v", [], "b", 5 * gap + 1)])
    q = ts_sample("v", ["a", "b"], "c", 5 * gap + 2)
    assert m.top_k([q], 1) == [["c"]]
    assert m.rank_targets([q]) == [1]
    # With one neighbour only the most similar session ({a, b, c}) votes: e gets nothing
    # but popularity, and ties with d (both 0 apart from popularity 0).
    one = SessionKNN(gap_ms=1000, recent=3, neighbours=1)
    one.ingest_items(items("a", "b", "c", "d", "e", "pop"))
    one.learn(stream)
    one.learn([ts_sample("v", [], "a", 5 * gap), ts_sample("v", [], "b", 5 * gap + 1)])
    s = one._scores([q])[0]
    assert s[one.index["c"]] > 0.5 and s[one.index["e"]] < 1e-6


def test_isgd_learns_a_users_item():
    m = ISGD()
    m.ingest_items(items(*(f"i{j}" for j in range(30))))
    for _ in range(40):
        m.learn([sample("u", [], "i7"), sample("w", [], "i3")])
    assert m.rank_targets([sample("u", [], "i7"), sample("w", [], "i3")]) == [1, 1]
    assert m.rank_targets([sample("u", [], "i3")]) != [1]
    # Scores are continuous: rank and top-k agree.
    q = [sample("u", [], f"i{j}") for j in range(30)]
    top = m.top_k(q[:1], 30)[0]
    assert [top.index(s.target) + 1 for s in q] == m.rank_targets(q)


def test_isgd_is_deterministic():
    runs = []
    for _ in range(2):
        m = ISGD()
        m.ingest_items(items("a", "b", "c"))
        m.learn([sample("u", ["a"], "b"), sample("v", [], "c")])
        runs.append(m.rank_targets([sample("u", [], "c"), sample("new", [], "a")]))
    assert runs[0] == runs[1]


def test_learner_top_k_agrees_with_rank_targets():
    cfg = load_config(None, ["model.text_encoder='none'", "model.dim=16", "model.hidden=16"])
    learner = OnlineLearner(cfg.model, cfg.trainer, torch.device("cpu"))
    meta = new_meta("m")
    data = topic_samples(512, seed=3)
    for b in range(0, 448, 64):
        learner.learn(data[b : b + 64], meta)
    q = data[448:]
    ranks = learner.rank_targets(q)
    tops = learner_top_k(learner, q, 10)
    for s, r, top in zip(q, ranks, tops, strict=True):
        assert len(top) == 10 and not set(top) & set(s.history)
        assert (r <= 10) == (s.target in top)
        if r <= 10:
            assert top[r - 1] == s.target


def test_run_eval_writes_the_report(tmp_path):
    cfg = load_config(
        None,
        [
            "replay.num_events=3000",
            "replay.num_items=100",
            "model.text_encoder='none'",
            "model.dim=16",
            "model.hidden=16",
            "trainer.batch_size=128",
        ],
    )
    stream = to_stream(synthetic(cfg.replay), cfg)
    res = run_eval(cfg, stream, warmup=0.2, k=10, n_buckets=4, out_dir=tmp_path, progress=False)
    names = [
        "online",
        "frozen",
        "popularity",
        "recent_popularity",
        "isgd",
        "cooccurrence_last_item",
        "cooccurrence_windowed",
        "session_knn",
    ]
    assert list(res["models"]) == names
    for name in names:
        m = res["models"][name]
        assert len(m["per_bucket"]) == 4
        assert sum(b["n"] for b in m["per_bucket"]) == res["test_positives"] > 0
        for d in [m["overall"], *m["per_bucket"]]:
            for metric in ("recall@10", "ndcg@10", "mrr", "coverage"):
                assert 0.0 <= d[metric] <= 1.0, (name, metric, d[metric])
    # The synthetic stream has a strong "next item" structure: co-occurrence beats popularity.
    overall = {n: res["models"][n]["overall"]["recall@10"] for n in names}
    assert overall["cooccurrence_last_item"] > overall["popularity"]
    assert overall["cooccurrence_windowed"] > overall["popularity"]
    assert res["online_vs_best_baseline"]["recall@10"]["best_baseline"] in names[2:]
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(res))
    md = (tmp_path / "results.md").read_text()
    assert "Recall@10" in md and "NDCG@10" in md and "online / best baseline" in md
    for name in names:
        assert f"| {name} |" in md
    for png in ("recall_over_time.png", "ndcg_over_time.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
