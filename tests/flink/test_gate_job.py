"""The publication gate on the real job: a label-flip burst through the Flink job in
deterministic mode. Versions made during the burst are held, LATEST never names one, and
every decision equals that of the offline replay of the same trainer code (so the
figures of benchmarks/poisoning.py, which runs that replay, are the job's)."""

from __future__ import annotations

import json

from flink_job.job import build_graph, make_env, registry_sink
from models.registry import read_latest, version_table
from offline.stream import trainer_without_flink
from replay.attacks import label_flip
from replay.datasets import synthetic
from tests.flink.helpers import json_stream


def test_a_label_flip_burst_is_held_by_the_job_as_offline(make_cfg, tmp_path):
    registry = tmp_path / "registry"
    cfg = make_cfg(
        f"export.registry_dir='{registry}'",
        "trainer.deterministic=true",
        "job.parallelism=2",
        "model.text_encoder='none'",
        "model.dim=16",
        "model.history_length=8",
        "trainer.batch_size=40",
        "trainer.export_every_steps=5",
        "trainer.gate_min_events=60",
        "job.checkpoint_interval_ms=0",
        "replay.num_events=3000",
        "replay.num_users=150",
        "replay.num_items=120",
        "replay.new_items_midstream=0",
        "replay.malformed_fraction=0.0",
        "replay.drift_every_events=0",
    )
    records = label_flip(list(synthetic(cfg.replay)), 0.5, 0.75, seed=3)
    env = make_env(cfg)

    def topic(name: str) -> list[bytes]:
        return [r.value for r in records if r.topic == name]

    p = build_graph(json_stream(env, topic("events")), cfg, json_stream(env, topic("items")))
    with registry_sink(p.versions, cfg).execute_and_collect() as results:
        statuses = [json.loads(r) for r in results]
    offline = trainer_without_flink(records, cfg)

    rows = version_table(registry, "default")
    assert [r["name"] for r in rows] == [v.name for v in offline.versions]
    for v in offline.versions:
        on_disk = json.loads((registry / "default" / v.name / "manifest.json").read_text())
        assert on_disk["publication"] == v.manifest["publication"]
    held = [r for r in rows if r["status"] == "held"]
    assert held, "no version made during the label-flip burst was held"
    assert all("below the floor" in r["reason"] for r in held)
    assert sorted(s["status"] for s in statuses).count("held") == len(held)
    published = [r["name"] for r in rows if r["status"] == "published"]
    assert read_latest(registry, "default") == published[-1]
    assert rows[-1]["status"] == "published"  # the clean events after the burst recover it
