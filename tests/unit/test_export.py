import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from models.config import ModelConfig, TrainerConfig
from models.export import NonFiniteModelError, build_version
from models.registry import list_versions, publish, read_latest
from models.serving import HotSwapRecommender, OnnxRecommender
from models.trainer import OnlineLearner, new_meta
from models.two_tower import TopKModel
from tests.unit.helpers import topic_samples

# The dot-product path (the transition memory's graph is tested in test_transitions.py).
MC = ModelConfig(dim=16, history_length=8, hidden=32, transition_slots=0)


@pytest.fixture(scope="module")
def trained():
    learner = OnlineLearner(MC, TrainerConfig(batch_size=64), torch.device("cpu"))
    meta = new_meta("m")
    data = topic_samples(3000)
    for i in range(0, len(data), 64):
        learner.learn(data[i : i + 64], meta)
    return learner, meta


def reference_item_matrix(learner, item_ids):
    """[V + 1, D] item vectors computed by the learner, in the exported item order."""
    idx = torch.tensor([0] + [learner.catalog.index[i] for i in item_ids])
    with torch.no_grad():
        return learner.item_vectors(idx).detach()


def test_onnx_matches_torch_within_1e_5(trained, tmp_path):
    learner, meta = trained
    mv = build_version(learner, meta, top_k=20, config={})
    path = publish(tmp_path, mv)
    rec = OnnxRecommender(path / "model.onnx")
    histories = [["t1_1", "t1_2", "t1_3"], ["t2_5"], [], ["t0_0"] * 20, ["unknown-item"]]
    for batch in (histories[:1], histories):  # dynamic batch size
        ids, mask = rec.encode(batch)
        excl = rec.encode_excluded(batch, [["t1_4", "t3_3"]] * len(batch))
        o_ids, o_scores = rec.raw(ids, mask, excl)
        ref = TopKModel(learner.model.eval(), reference_item_matrix(learner, rec.item_ids), 20)
        with torch.no_grad():
            t_ids, t_scores = ref(*(torch.from_numpy(a) for a in (ids, mask, excl)))
        np.testing.assert_allclose(o_scores, t_scores.numpy(), atol=1e-5, rtol=0)
        distinct = 0
        for o_row, t_row, s_row in zip(o_ids, t_ids.numpy(), t_scores.numpy(), strict=True):
            if np.all(np.diff(s_row) < -1e-5):  # no ties: the order is fully determined
                distinct += 1
                assert (o_row == t_row).all()
        assert distinct >= 1


def test_recommendations_rank_known_items_and_skip_history(trained, tmp_path):
    learner, meta = trained
    rec = OnnxRecommender(publish(tmp_path, build_version(learner, meta, 30, {})) / "model.onnx")
    hist = ["t3_1", "t3_2", "t3_4"]
    out = rec.recommend([hist], k=10)[0]
    items = [i for i, _ in out]
    scores = [s for _, s in out]
    assert len(set(items)) == 10 and not set(items) & set(hist)
    assert scores == sorted(scores, reverse=True)
    # The model learned topics: most of the top-10 are from the user's topic.
    assert sum(i.startswith("t3_") for i in items) >= 6, items
    # The caller's exclusions are never recommended, and the rest keeps its order.
    fewer = [i for i, _ in rec.recommend([hist], k=10, exclude=[items[:3]])[0]]
    assert not set(fewer) & set(items[:3]) and fewer[:7] == items[3:]


def test_history_beyond_what_the_model_reads_is_never_recommended(trained, tmp_path):
    """The graph reads the last H items; every older one is excluded through exclude_ids."""
    learner, meta = trained
    rec = OnnxRecommender(publish(tmp_path, build_version(learner, meta, 30, {})) / "model.onnx")
    recent = ["t3_1", "t3_2", "t3_4"]
    top = [i for i, _ in rec.recommend([recent], k=5)[0]]
    # The same user with their best-matching items seen long ago (beyond the last H).
    older = [*top, *[f"t0_{n}" for n in range(rec.history_length)]]
    items = [i for i, _ in rec.recommend([[*older, *recent]], k=10)[0]]
    assert len(items) == 10 and not set(items) & set(older + recent)


def test_manifest_fields(trained):
    learner, meta = trained
    mv = build_version(learner, meta, 10, {"x": 1})
    m = mv.manifest
    for key in (
        "model_key",
        "version",
        "steps",
        "events_seen",
        "event_time_hwm_ms",
        "config",
        "content_hash",
        "metrics",
    ):
        assert key in m
    assert m["version"] == meta["version"] + 1 and m["events_seen"] == 3000
    assert mv.name.startswith(f"v{m['version']:06d}-")


def test_registry_versions_are_immutable_and_latest_moves_forward(trained, tmp_path):
    learner, meta = trained
    meta = dict(meta)
    v1 = build_version(learner, meta, 10, {})
    meta["version"] = 1
    v2 = build_version(learner, meta, 10, {})
    publish(tmp_path, v2)
    publish(tmp_path, v1)  # an older version arriving late never moves LATEST back
    assert read_latest(tmp_path, "m") == v2.name
    before = (tmp_path / "m" / v2.name / "model.onnx").stat().st_mtime_ns
    publish(tmp_path, v2)  # idempotent
    assert (tmp_path / "m" / v2.name / "model.onnx").stat().st_mtime_ns == before
    assert list_versions(tmp_path, "m") == [v1.name, v2.name]
    assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".tmp")]
    manifest = json.loads((tmp_path / "m" / v2.name / "manifest.json").read_text())
    assert manifest["content_hash"] == v2.manifest["content_hash"]


def test_registry_never_shows_a_half_written_version(trained, tmp_path, monkeypatch):
    learner, meta = trained
    v1 = build_version(learner, dict(meta), 10, {})
    publish(tmp_path, v1)
    meta2 = {**meta, "version": 1}
    v2 = build_version(learner, meta2, 10, {})

    def crash(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("models.registry.os.rename", crash)
    with pytest.raises(OSError, match="disk full"):
        publish(tmp_path, v2)
    # The reader's view is unchanged: no v2 directory, LATEST still v1, no debris listed.
    assert list_versions(tmp_path, "m") == [v1.name]
    assert read_latest(tmp_path, "m") == v1.name
    assert not [p for p in os.listdir(tmp_path / "m") if p.startswith(".tmp")]


def test_a_version_remade_after_a_failure_gets_its_own_directory(trained, tmp_path):
    learner, meta = trained
    first = build_version(learner, {**meta, "version": 4}, 10, {})
    remade = build_version(learner, {**meta, "version": 4}, 5, {})  # other content
    assert first.version == remade.version and first.name != remade.name
    publish(tmp_path, first)
    first_bytes = (tmp_path / "m" / first.name / "manifest.json").read_bytes()
    publish(tmp_path, remade)
    assert read_latest(tmp_path, "m") == remade.name
    assert (tmp_path / "m" / first.name / "manifest.json").read_bytes() == first_bytes
    publish(tmp_path, first)  # a zombie writer of the old attempt cannot take LATEST back
    assert read_latest(tmp_path, "m") == remade.name


def test_hot_swap_follows_latest(trained, tmp_path):
    learner, meta = trained
    meta = dict(meta)
    hs = HotSwapRecommender(tmp_path, "m")
    with pytest.raises(RuntimeError, match="no model version published"):
        hs.recommend([["t1_1"]])
    publish(tmp_path, build_version(learner, meta, 10, {}))
    assert hs.refresh() and not hs.refresh()
    first = hs.version_name
    meta["version"] = 5
    publish(tmp_path, build_version(learner, meta, 10, {}))
    assert hs.refresh() and hs.version_name != first
    assert len(hs.recommend([["t1_1"]], k=3)[0]) == 3


def test_non_finite_model_is_never_exported(trained):
    learner, meta = trained
    saved = learner.model.user_tower.cold.detach().clone()
    with torch.no_grad():
        learner.model.user_tower.cold.fill_(float("nan"))
    try:
        with pytest.raises(NonFiniteModelError):
            build_version(learner, meta, 10, {})
    finally:
        with torch.no_grad():
            learner.model.user_tower.cold.copy_(saved)


def test_ann_serving_files_agree_with_the_topk_graph(trained, tmp_path):
    """user_encoder.onnx + item_vectors.npy (for ANN serving) give the same top-k scores."""
    import onnxruntime as ort

    learner, meta = trained
    path = publish(tmp_path, build_version(learner, meta, 10, {}))
    rec = OnnxRecommender(path / "model.onnx")
    ids, mask = rec.encode([["t1_1", "t1_2"], ["t4_0", "t4_3", "t4_9"]])
    _, top_scores = rec.raw(ids, mask)
    enc = ort.InferenceSession(str(path / "user_encoder.onnx"), providers=["CPUExecutionProvider"])
    (user,) = enc.run(None, {"history_ids": ids, "history_mask": mask})
    items = np.load(path / "item_vectors.npy")
    assert json.loads((path / "item_ids.json").read_text()) == rec.item_ids
    scores = user @ items.T
    for row in range(2):
        scores[row, ids[row]] = -np.inf
        scores[row, 0] = -np.inf
    ref = -np.sort(-scores, axis=1)[:, :10]
    np.testing.assert_allclose(top_scores, ref, atol=1e-5)


def _learner_with_memory():
    """A trained learner with the transition memory: the graph with successors and the
    never-interacted mask."""
    mc = ModelConfig(dim=16, history_length=4, hidden=32, transition_slots=8)
    learner = OnlineLearner(mc, TrainerConfig(batch_size=16), torch.device("cpu"))
    meta = new_meta("m")
    data = topic_samples(320)
    for i in range(0, len(data), 16):
        learner.learn(data[i : i + 16], meta)
    return learner, meta


def _rebuilt_from_cache(E, monkeypatch, learner, meta, previous):
    """The version after ``previous``, which must not trace a graph."""
    meta["version"] = previous.version
    with monkeypatch.context() as m:
        m.setattr(E, "_trace", lambda *a: pytest.fail("traced again: the graph was not reused"))
        return build_version(learner, meta, 5, {})


def _assert_same_as_fresh_trace(E, learner, meta, reused, newest: int) -> None:
    """onnxruntime gives for ``reused`` what a fresh trace of the same model gives, on
    histories that include item position ``newest``."""
    import onnxruntime as ort

    trace = E._trace
    E._GRAPHS.clear()
    assert E._trace is trace
    meta["version"] = reused.version - 1
    fresh = build_version(learner, meta, 5, {})
    feeds = {
        "history_ids": np.array([[newest, 2, 3, 0], [4, 0, 0, 0]], dtype=np.int64),
        "history_mask": np.array([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=bool),
    }
    top_feeds = {**feeds, "exclude_ids": np.array([[5, 0, 0], [6, 7, 8]], dtype=np.int64)}
    for a, b, f in (
        (reused.onnx_bytes, fresh.onnx_bytes, top_feeds),
        (reused.extras["user_encoder.onnx"], fresh.extras["user_encoder.onnx"], feeds),
    ):
        out_a = ort.InferenceSession(a, providers=["CPUExecutionProvider"]).run(None, f)
        out_b = ort.InferenceSession(b, providers=["CPUExecutionProvider"]).run(None, f)
        for x, y in zip(out_a, out_b, strict=True):
            np.testing.assert_array_equal(x, y)


def test_reused_graph_with_new_weights_matches_a_fresh_trace(monkeypatch):
    """A version whose shapes match an earlier one's reuses its traced graph with the new
    weights; onnxruntime gives what a fresh trace of the same model gives."""
    from models import export as E

    learner, meta = _learner_with_memory()
    E._GRAPHS.clear()
    first = build_version(learner, meta, 5, {})
    assert len(E._GRAPHS) == 2  # model.onnx and user_encoder.onnx graphs
    # The cache keeps graph structure only: no weights (initializers are names).
    inits = [i for g in E._GRAPHS.values() for i in g.graph.initializer]
    assert inits and all(not i.raw_data and not i.dims for i in inits)
    more = topic_samples(64, seed=3)  # same items: the same shapes
    for i in range(0, len(more), 16):
        learner.learn(more[i : i + 16], meta)
    reused = _rebuilt_from_cache(E, monkeypatch, learner, meta, first)
    assert reused.onnx_bytes != first.onnx_bytes  # new weights
    _assert_same_as_fresh_trace(E, learner, meta, reused, newest=1)


def test_a_grown_catalogue_reuses_the_graph_and_matches_a_fresh_trace(monkeypatch):
    """Graphs that do not depend on the number of items (checked by tracing one item
    more) are reused when the catalogue grows; onnxruntime gives what a fresh trace of the
    same model gives. A live catalogue grows all the time: without this, every version
    would be traced again."""
    from models import export as E

    learner, meta = _learner_with_memory()
    E._GRAPHS.clear()
    first = build_version(learner, meta, 5, {})
    assert [key[-1] for key in E._GRAPHS] == [True, True]  # both graphs: any item count
    assert all(not g.graph.value_info for g in E._GRAPHS.values())
    grown = [
        dataclasses.replace(s, target=f"new{i}") for i, s in enumerate(topic_samples(32, seed=5))
    ]
    for i in range(0, len(grown), 16):
        learner.learn(grown[i : i + 16], meta)
    reused = _rebuilt_from_cache(E, monkeypatch, learner, meta, first)
    n = reused.manifest["num_items"]
    assert n == first.manifest["num_items"] + 32
    _assert_same_as_fresh_trace(E, learner, meta, reused, newest=n)
