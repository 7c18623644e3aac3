"""Same numbers both ways: the Flink job in deterministic mode and the offline replay of the
same trainer code (offline/stream.py trainer_without_flink) give the same prequential metrics,
record by record, and the same model versions."""

from __future__ import annotations

import json
import math

import pytest

from flink_job.job import build_graph, make_env, registry_sink
from models.registry import list_versions
from models.text_encoder import configured_precision, load_configured_encoder
from offline.stream import trainer_without_flink
from replay.datasets import synthetic
from tests.flink.helpers import json_stream


def assert_same(a, b, path="record"):
    """Equal structure; ints, strings and bools equal; floats within 1e-9."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: {a} != {b}"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, int | float) and isinstance(b, int | float), f"{path}: {a} != {b}"
        assert math.isclose(a, b, rel_tol=0, abs_tol=1e-9), f"{path}: {a} != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.mark.parametrize("text", ["id-only", "text-encoder"])
def test_job_and_offline_replay_give_the_same_metrics(make_cfg, tmp_path, request, text):
    """With a text encoder the job embeds item texts in its own stage (udfs/embed.py) and
    the offline replay inside the learner: the vectors, and so the models, are the same."""
    registry = tmp_path / "registry"
    encoder = "none" if text == "id-only" else str(request.getfixturevalue("tiny_bert_dir"))
    cfg = make_cfg(
        f"export.registry_dir='{registry}'",
        f"export.tensorboard_dir='{tmp_path / 'tb'}'",
        "trainer.deterministic=true",
        "job.parallelism=2",
        f"model.text_encoder='{encoder}'",
        "model.dim=16",
        "model.history_length=8",
        "trainer.batch_size=40",
        "trainer.export_every_steps=20",
        "trainer.drift_min_samples=5",
        "trainer.drift_delta=0.005",
        "trainer.drift_threshold=0.5",
        "job.checkpoint_interval_ms=0",
        "replay.num_events=1600",
        "replay.num_items=100",
        "replay.new_items_midstream=20",
        "replay.drift_every_events=500",
        "replay.malformed_fraction=0.0",
    )
    records = list(synthetic(cfg.replay))
    env = make_env(cfg)

    def stream(topic):
        return json_stream(env, [r.value for r in records if r.topic == topic])

    p = build_graph(stream("events"), cfg, stream("items"))
    out = registry_sink(p.versions, cfg).union(p.metrics)
    with out.execute_and_collect() as results:
        collected = [json.loads(r) for r in results]
    job_metrics = sorted((r for r in collected if "batch" in r), key=lambda r: r["step"])

    precision = configured_precision(cfg.model, cfg.trainer.deterministic)
    assert precision == "float32"  # "auto" in deterministic mode, as the job resolves it
    offline = trainer_without_flink(
        records, cfg, load_configured_encoder(cfg.model, deterministic=True)
    )

    assert len(job_metrics) == len(offline.metrics) >= 30
    for a, b in zip(job_metrics, offline.metrics, strict=True):
        assert_same(a, b, f"step {a['step']}")
    last = job_metrics[-1]
    assert last["events_seen"] == offline.meta["events_seen"] > 1500
    assert last["cumulative"]["n"] == sum(r["batch"]["n"] for r in job_metrics)
    assert 0 < last["cumulative"]["hits"] < last["cumulative"]["n"]
    assert last["drift"]["detections"] > 0  # exercised, and equal both ways (above)
    # The models are the same too: version names carry the ONNX content hash.
    assert list_versions(str(registry), "default") == [v.name for v in offline.versions]
    manifest = json.loads(
        (registry / "default" / offline.versions[-1].name / "manifest.json").read_text()
    )
    assert_same(
        manifest["metrics"]["prequential"], offline.versions[-1].manifest["metrics"]["prequential"]
    )
    # The trainer also wrote the records as TensorBoard scalars (flushed when it closed).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb" / "default"))
    acc.Reload()
    cum = acc.Scalars("cumulative/recall@10")
    assert [e.step for e in cum] == [r["step"] for r in job_metrics]
    assert math.isclose(cum[-1].value, last["cumulative"]["recall@10"], rel_tol=1e-6)
