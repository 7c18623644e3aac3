"""Forgetting a user through the control input (kafka.control_topic) on the real graph."""

from __future__ import annotations

import json

from pyflink.common import Types, WatermarkStrategy

from flink_job.job import build_graph, make_env, registry_sink
from tests.flink.test_pipeline import JsonTs, topic_events

T0 = 1_700_000_000_000


def test_a_forget_request_deletes_pending_events_and_later_ones_start_afresh(make_cfg):
    """1,600 events of 40 users, then alice's in the last window: 4 before her forget
    request's time, 3 after. The request reaches the user stage at once, while her window
    closes only at the end of the input: her 4 earlier events are dropped there (pending
    events of a forgotten user), the 3 later ones are learned as a new user's."""
    cfg = make_cfg(
        "model.text_encoder='none'",
        "trainer.deterministic=true",
        "trainer.batch_size=32",
        "trainer.export_every_steps=10",
        "job.window_ms=600000",
        "job.checkpoint_interval_ms=0",
        "kafka.control_topic='control'",
    )
    events = topic_events(1600)
    last = json.loads(events[-1])["ts"]
    alice = [
        json.dumps(
            {
                "event_id": f"a{i}",
                "user_id": "alice",
                "item_id": f"t1_{i}",
                "type": "click",
                "ts": last + 1000 * (i + 1),
            }
        ).encode()
        for i in range(7)
    ]
    forget_at = last + 4500  # after a0..a3, before a4..a6
    control = [
        json.dumps({"action": "forget", "user_id": "alice", "ts": forget_at}).encode(),
        b'{"action": "delete-everything", "user_id": "bob", "ts": 1}',
    ]
    env = make_env(cfg)

    def stream(payloads: list[bytes]):
        return (
            env.from_collection([p.decode() for p in payloads], type_info=Types.STRING())
            .map(lambda s: s.encode(), output_type=Types.PRIMITIVE_ARRAY(Types.BYTE()))
            .assign_timestamps_and_watermarks(
                WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(JsonTs())
            )
            .set_parallelism(1)
        )

    p = build_graph(stream(events + alice), cfg, None, stream(control))
    out = registry_sink(p.versions, cfg).union(p.dead)
    with out.execute_and_collect() as results:
        collected = [json.loads(r) for r in results]
    dead = [o for o in collected if "reason" in o]
    assert len(dead) == 1 and dead[0]["source"] == "control"
    assert "field 'action' must be 'forget'" in dead[0]["reason"]
    seen = max(o["events_seen"] for o in collected if "status" in o)
    assert seen == len(events) + 3
