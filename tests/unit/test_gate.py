"""The publication gate (models/gate.py), automatic rollback, and the registry's
statuses, revocations, rollbacks and pins (models/registry.py)."""

import dataclasses
import json
import pickle

import pytest
import torch

from models.config import ModelConfig, TrainerConfig
from models.export import build_version
from models.gate import GateState, PublicationGate
from models.online import train_and_maybe_export
from models.registry import (
    publish,
    read_latest,
    release,
    revoke,
    rollback,
    version_table,
)
from models.trainer import OnlineLearner, new_meta
from models.version import ModelVersion
from tests.unit.helpers import topic_samples

MC = ModelConfig(dim=16, history_length=8, hidden=32, transition_slots=0)
TC = TrainerConfig(batch_size=32, export_every_steps=10, gate_min_events=100)


def learner(cfg: TrainerConfig = TC) -> OnlineLearner:
    return OnlineLearner(MC, cfg, torch.device("cpu"))


def run(lr: OnlineLearner, meta: dict, samples, state: dict) -> list:
    """Fire batch by batch as the Flink trainer does, with ``state`` as its keyed state."""
    out = []
    bs = lr.cfg.batch_size
    rows, items = state.setdefault("rows", {}), state.setdefault("items", {})
    for i in range(0, len(samples), bs):
        f = train_and_maybe_export(
            lr,
            meta,
            samples[i : i + bs],
            lambda: state.get("dense"),
            lambda: list(rows.items()),
            10,
            {},
            items_state=lambda: list(items.items()),
            gate_blob=lambda: state.get("gate"),
        )
        r = f.result
        rows.update(r.touched_rows)
        items.update(r.touched_items)
        for gone in r.removed_rows:
            rows.pop(gone, None)
        for gone in r.removed_items:
            items.pop(gone, None)
        if r.dense_blob is not None:
            state["dense"] = r.dense_blob
        if r.gate_blob is not None:
            state["gate"] = r.gate_blob
        out.append(f)
    return out


def test_clean_stream_publishes_first_and_improving_versions(tmp_path):
    lr, meta, state = learner(), new_meta("m"), {}
    firings = run(lr, meta, topic_samples(3200), state)
    versions = [f.version for f in firings if f.version is not None]
    assert len(versions) >= 5
    docs = [v.manifest["publication"] for v in versions]
    assert docs[0]["status"] == "published" and docs[0]["reason"] == "first version"
    for d in docs[1:]:
        assert d["events"] >= TC.gate_min_events
        assert d["candidate_recall"] is not None and d["serving_recall"] is not None
    # The model learns this stream: its candidates pass against the version serving.
    assert sum(d["status"] == "published" for d in docs) >= len(docs) - 1
    for v in versions:
        publish(tmp_path, v)
    newest_published = [v for v in versions if v.manifest["publication"]["status"] == "published"]
    assert read_latest(tmp_path, "m") == newest_published[-1].name
    st = GateState.of(meta)
    assert st.serving is not None and st.serving.name == newest_published[-1].name
    assert st.published + st.held == len(versions)


def test_a_worse_candidate_is_held_and_never_moves_latest(tmp_path):
    lr, meta, state = learner(), new_meta("m"), {}
    run(lr, meta, topic_samples(640), state)
    st = GateState.of(meta)
    assert st.serving is not None
    serving = st.serving.name
    # Positives since publication: the serving version hit far more than the run did.
    st.n, st.live_hits, st.serving_hits = 400, 40, 200
    st.save(meta)
    v = build_version(lr, meta, 10, {})
    assert lr.gate.decide(meta, v) is None
    doc = v.manifest["publication"]
    assert doc["status"] == "held"
    assert "0.1000" in doc["reason"] and "0.5000" in doc["reason"] and serving in doc["reason"]
    assert doc["held"] == 1 and doc["serving"] == serving
    publish(tmp_path, v)
    assert read_latest(tmp_path, "m") is None  # stored, but nothing published here
    assert (tmp_path / "m" / v.name / "model.onnx").is_file()
    assert version_table(tmp_path, "m")[0]["status"] == "held"


def test_too_few_events_hold_a_candidate_with_the_count():
    lr, meta, state = learner(), new_meta("m"), {}
    run(lr, meta, topic_samples(320), state)  # v1 published at step 10
    st = GateState.of(meta)
    st.n, st.live_hits, st.serving_hits = 12, 3, 1
    st.save(meta)
    v = build_version(lr, meta, 10, {})
    lr.gate.decide(meta, v)
    assert v.manifest["publication"]["status"] == "held"
    assert "only 12 positives" in v.manifest["publication"]["reason"]


def test_a_graph_that_fails_to_load_is_held_with_the_error():
    lr, meta = learner(), new_meta("m")
    run(lr, meta, topic_samples(64), {})
    good = build_version(lr, meta, 10, {})
    bad = ModelVersion("m", good.version, b"not an onnx graph", dict(good.manifest))
    lr.gate.decide(meta, bad)
    doc = bad.manifest["publication"]
    assert doc["status"] == "held" and doc["reason"].startswith("load or probe failed")


def test_gate_off_publishes_everything_and_scores_nothing():
    cfg = dataclasses.replace(TC, publish_gate=False)
    lr, meta, state = learner(cfg), new_meta("m"), {}
    firings = run(lr, meta, topic_samples(1600), state)
    docs = [f.version.manifest["publication"] for f in firings if f.version]
    assert docs and all(d["status"] == "published" and d["reason"] == "gate off" for d in docs)
    assert "gate" not in state and GateState.of(meta).serving is None


def test_restored_gate_decides_as_the_uninterrupted_one():
    """The gate's graphs and figures are in state: a new process given them (a restore)
    makes the same decisions, with the same figures, as the process that kept running."""
    samples = topic_samples(2560, seed=3)
    a, meta_a, state_a = learner(), new_meta("m"), {}
    whole = run(a, meta_a, samples, state_a)
    b, meta_b, state_b = learner(), new_meta("m"), {}
    first = run(b, meta_b, samples[:1280], state_b)
    meta_b = pickle.loads(pickle.dumps(meta_b))
    rest = run(learner(), meta_b, samples[1280:], state_b)
    docs = [f.version.manifest["publication"] for f in whole if f.version]
    again = [f.version.manifest["publication"] for f in first + rest if f.version]
    assert docs == again


def test_a_serving_version_that_degrades_is_rolled_back_to_the_previous():
    cfg = dataclasses.replace(TC, rollback_share=0.5, rollback_steps=3)
    good, meta = learner(cfg), new_meta("m")
    run(good, meta, topic_samples(1600), {})
    gate = PublicationGate(cfg)
    v1 = build_version(good, meta, 10, {})
    gate.decide(meta, v1)  # the first version: published
    meta["version"] = v1.version
    # A broken candidate slips through with a high figure (a poisoned burst inflates it).
    broken = learner(cfg)
    run(broken, new_meta("m"), topic_samples(32, seed=9), {})
    v2 = build_version(broken, meta, 10, {})
    st = GateState.of(meta)
    st.n, st.live_hits, st.serving_hits = 200, 180, 100
    st.save(meta)
    assert gate.decide(meta, v2) is not None
    assert GateState.of(meta).serving.name == v2.name
    rev = None
    clean = topic_samples(640, seed=11)
    for i in range(0, len(clean), 32):
        batch = clean[i : i + 32]
        rev, blob = gate.observe(meta, batch, [10**6] * len(batch), good.seen)
        if rev is not None:
            break
    assert rev is not None, "the degraded serving version was never rolled back"
    assert (rev.revoked, rev.rollback_to) == (v2.name, v1.name)
    assert blob is not None and pickle.loads(blob)[0] == v1.onnx_bytes
    st = GateState.of(meta)
    assert st.serving.name == v1.name and st.previous is None and st.rollbacks == 1
    assert "stayed below 0.5" in rev.reason


def test_registry_revocation_rollback_pin_and_release(tmp_path):
    lr, meta, state = learner(dataclasses.replace(TC, publish_gate=False)), new_meta("m"), {}
    versions = [f.version for f in run(lr, meta, topic_samples(960), state) if f.version]
    assert len(versions) == 3
    for v in versions:
        publish(tmp_path, v)
    v1, v2, v3 = (v.name for v in versions)
    assert read_latest(tmp_path, "m") == v3
    # Automatic: the trainer's revocation record moves LATEST back and is idempotent.
    rec = {"kind": "revocation", "model_key": "m", "revoked": v3, "rollback_to": v2}
    rec["reason"] = "test"
    assert revoke(tmp_path, rec) and read_latest(tmp_path, "m") == v2
    assert not revoke(tmp_path, rec)  # a replay: LATEST is no longer the revoked one
    publish(tmp_path, versions[2])  # a replayed publication of the revoked version
    assert read_latest(tmp_path, "m") == v2
    # Manual: rollback to the previous, then LATEST stays pinned until released.
    r = rollback(tmp_path, "m", None, by="ops", reason="bad clicks")
    assert (r["from"], r["to"], r["by"]) == (v2, v1, "ops")
    assert read_latest(tmp_path, "m") == v1
    table = {row["name"]: row for row in version_table(tmp_path, "m")}
    assert [table[n]["status"] for n in (v1, v2, v3)] == ["published", "revoked", "revoked"]
    assert table[v1]["latest"]
    with pytest.raises(ValueError, match="no published, unrevoked version below"):
        rollback(tmp_path, "m", None, by="ops", reason="again")
    with pytest.raises(ValueError, match="has no version 'v9'"):
        rollback(tmp_path, "m", "v9", by="ops", reason="typo")
    more = [f.version for f in run(lr, meta, topic_samples(640, seed=5), state) if f.version][-1]
    publish(tmp_path, more)
    assert read_latest(tmp_path, "m") == v1, "a pinned key must not move forward"
    assert release(tmp_path, "m") == more.name == read_latest(tmp_path, "m")
    with pytest.raises(ValueError, match="is already serving"):
        rollback(tmp_path, "m", str(more.version), by="ops", reason="noop")


def test_versions_and_rollback_commands(tmp_path, capsys):
    from rtrec.cli import main

    lr = learner(dataclasses.replace(TC, publish_gate=False))
    versions = [f.version for f in run(lr, new_meta("m"), topic_samples(640), {}) if f.version]
    for v in versions:
        publish(tmp_path, v)
    reg = ["--registry", str(tmp_path)]
    assert main(["versions", "m", *reg]) == 0
    out = capsys.readouterr().out
    assert f"* {versions[-1].name}" in out and "published" in out
    assert main(["rollback", "m", *reg]) == 2  # no --reason
    assert "needs --reason" in capsys.readouterr().err
    assert main(["rollback", "m", "--reason", "bad", "--by", "ops", *reg]) == 0
    assert read_latest(tmp_path, "m") == versions[0].name
    assert main(["rollback", "m", "--release", *reg]) == 0
    assert read_latest(tmp_path, "m") == versions[0].name  # the newer one stays revoked
    capsys.readouterr()
    assert main(["versions", "m", "--json", *reg]) == 0
    rows = {r["name"]: r["status"] for r in json.loads(capsys.readouterr().out)}
    assert rows[versions[1].name] == "revoked"


@pytest.mark.parametrize(
    ("live_hits", "serving_hits", "status"),
    [(40, 40, "held"), (40, 38, "held"), (60, 40, "published"), (220, 200, "published")],
)
def test_the_floor_holds_a_collapse_that_poisoned_events_would_hide(
    live_hits, serving_hits, status
):
    """On flipped events every model scores about as badly: a candidate far below what
    the serving version scored at publication passes only if it clearly beats it."""
    lr, meta, state = learner(), new_meta("m"), {}
    run(lr, meta, topic_samples(320), state)
    st = GateState.of(meta)
    st.serving.baseline = 0.5  # the floor: gate_floor 0.5 x 0.5 = 0.25
    st.n, st.live_hits, st.serving_hits = 400, live_hits, serving_hits
    st.save(meta)
    v = build_version(lr, meta, 10, {})
    lr.gate.decide(meta, v)
    doc = v.manifest["publication"]
    assert doc["status"] == status, doc["reason"]
    if status == "held":
        assert "below the floor 0.2500" in doc["reason"]
