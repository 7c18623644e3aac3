"""The real job graph on a local Flink mini-cluster, fed from a collection (no Kafka)."""

from __future__ import annotations

import itertools
import json
import random

from pyflink.common import Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner

from flink_job.job import build_graph, make_env, registry_sink
from models.registry import list_versions, read_latest
from models.serving import HotSwapRecommender
from replay.datasets import hostile_payloads


class JsonTs(TimestampAssigner):
    def extract_timestamp(self, value, record_timestamp):
        try:
            return int(json.loads(value)["ts"])
        except Exception:
            return 0  # malformed records: any time, they never reach a window


def topic_events(n: int, seed: int = 1) -> list[bytes]:
    """Users u{k} only interact with items of topic k % 4, in time order."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.randrange(40)
        topic = u % 4
        out.append(
            json.dumps(
                {
                    "event_id": f"e{i}",
                    "user_id": f"u{u}",
                    "item_id": f"t{topic}_{rng.randrange(15)}",
                    "type": rng.choice(["view", "click", "purchase"]),
                    "ts": 1_700_000_000_000 + i * 500,
                }
            ).encode()
        )
    return out


def run_on_collection(cfg, records: list[bytes], to_bytes=None) -> list[dict]:
    """The job graph on ``records`` (event time = their "ts", monotonous watermarks):
    registry statuses, dead letters and metrics records, as JSON objects."""
    env = make_env(cfg)
    # PyFlink cannot ship byte arrays in from_collection; carry them as latin-1 text instead.
    raw = (
        env.from_collection([r.decode("latin-1") for r in records], type_info=Types.STRING())
        .map(
            to_bytes or (lambda s: s.encode("latin-1")),
            output_type=Types.PRIMITIVE_ARRAY(Types.BYTE()),
        )
        # Like the Kafka source: record timestamps = event time, with watermarks.
        .assign_timestamps_and_watermarks(
            WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(JsonTs())
        )
    )
    versions, dead, metrics = build_graph(raw, cfg)
    out = registry_sink(versions, cfg).union(dead, metrics)
    with out.execute_and_collect() as results:
        return [json.loads(r) for r in results]


def test_pipeline_trains_exports_and_dead_letters(make_cfg, tmp_path):
    cfg = make_cfg(
        "model.text_encoder='none'",
        "trainer.batch_size=32",
        "trainer.export_every_steps=10",
        "trainer.export_every_seconds=3600.0",
        "job.checkpoint_interval_ms=0",
        "model.dim=16",
        "model.history_length=8",
    )
    valid = topic_events(2000)
    hostile = hostile_payloads(random.Random(5), 1_700_000_000_000)
    records = valid[:1000] + hostile + valid[1000:]

    out = run_on_collection(cfg, records)

    dead_letters = [o for o in out if "reason" in o]
    statuses = [o for o in out if "status" in o]
    # Every hostile record is dead-lettered with a reason; no valid one is.
    assert len(dead_letters) == len(hostile)
    assert all(d["reason"] and d["source"] == "events" for d in dead_letters)
    # Every valid event was trained on, exactly once, and versions were published.
    assert len(statuses) >= 2
    assert max(s["events_seen"] for s in statuses) == len(valid)
    registry = cfg.export.registry_dir
    names = list_versions(registry, "default")
    assert len(names) == len(statuses) and read_latest(registry, "default") == names[-1]
    manifest = json.loads(
        (tmp_path / "registry" / "default" / names[-1] / "manifest.json").read_text()
    )
    assert manifest["events_seen"] == len(valid)
    assert manifest["event_time_hwm_ms"] == 1_700_000_000_000 + 1999 * 500
    # The whole input arrives at once, faster than the trainer learns it: catch-up steps
    # of up to catchup_factor (4) x batch_size samples (models.online.step_due).
    metrics = sorted((o for o in out if "batch" in o), key=lambda o: o["step"])
    seen = [0] + [m["events_seen"] for m in metrics]
    steps = [b - a for a, b in itertools.pairwise(seen) if b > a]
    assert sum(steps) == len(valid) and max(steps) <= 4 * 32
    assert max(steps) > 32, steps

    rec = HotSwapRecommender(registry, "default")
    assert rec.refresh()
    top = [item for item, _ in rec.recommend([["t2_1", "t2_3", "t2_4"]], k=5)[0]]
    assert sum(t.startswith("t2_") for t in top) >= 3, top


class StallBefore:
    """Identity on latin-1 text, sleeping before the first record that contains ``marker``
    (so the periodic watermark of everything before it reaches the user windows first)."""

    def __init__(self, marker: str, seconds: float) -> None:
        self.marker, self.seconds, self.done = marker, seconds, False

    def __call__(self, s: str) -> bytes:
        if not self.done and self.marker in s:
            import time

            time.sleep(self.seconds)
            self.done = True
        return s.encode("latin-1")


def test_late_events_go_to_the_dead_letter_output(make_cfg):
    """Events whose user window closed before they arrived are dead-lettered with the
    reason (not trained on, not lost); the events in time are all trained on."""
    cfg = make_cfg(
        "model.text_encoder='none'",
        "trainer.batch_size=16",
        "trainer.export_every_steps=1000",
        "trainer.export_every_seconds=3600.0",
        "job.checkpoint_interval_ms=0",
        "job.out_of_orderness_ms=0",
        "job.bundle_size=1",  # every record leaves each Python stage at once
        "model.dim=8",
        "model.history_length=4",
    )
    valid = topic_events(300)
    t0 = 1_700_000_000_000
    late = [
        json.dumps(
            {"event_id": f"late{i}", "user_id": f"u{i}", "item_id": "t0_1", "type": "click",
             "ts": t0 + i * 500}  # the windows of the first events, long closed
        ).encode()
        for i in range(5)
    ]  # fmt: skip
    out = run_on_collection(cfg, valid + late, StallBefore('"late0"', 2.0))

    dead_letters = [o for o in out if "reason" in o]
    assert sorted(d["payload"].split()[0] for d in dead_letters) == [
        f"event_id=late{i}" for i in range(5)
    ]
    assert all(d["reason"].startswith("late event") for d in dead_letters)
    assert max(o["events_seen"] for o in out if "status" in o) == len(valid)


def test_the_trainer_and_its_sinks_run_once_per_model_key(make_cfg):
    """At job.parallelism 2 the parsing and user-window stages run twice, the trainer and
    everything after it once: a job trains one model key, so a second trainer subtask would
    only idle, and the version sinks stay a forward chain that keeps versions in order."""
    from flink_job.job import build_job, task_slots

    cfg = make_cfg("job.parallelism=2", "kafka.metrics_topic='metrics'")
    env = make_env(cfg)
    build_job(env, cfg, "127.0.0.1:9")  # the graph only: nothing connects before execute
    nodes = json.loads(env.get_execution_plan())["nodes"]
    at = {p: sorted(n["contents"] for n in nodes if n["parallelism"] == p) for p in (1, 2)}
    for name in ("parse-events", "user-window", "embed-items", "dlq-sink: Writer"):
        assert name in at[2], at
    for name in ("trainer", "version-time", "registry-sink", "models-sink: Writer"):
        assert name in at[1], at
    # Including the operators PyFlink adds to assign the versions' timestamps.
    assert sum("Extract-Timestamp" in c for c in at[1]) == 2, at
    assert sum("Timestamps/Watermarks" in c for c in at[1]) == 2, at
    assert not [c for c in at[2] if "Timestamp" in c or "metrics" in c], at
    # Slots: 2 for the parsing / user-window / embedding group, 1 for the trainer's.
    assert task_slots(cfg) == 3
