"""Forgetting a user through the control input (kafka.control_topic) on the real graph."""

from __future__ import annotations

import json

from flink_job.job import build_graph, make_env, registry_sink
from tests.flink.helpers import json_stream
from tests.flink.test_pipeline import topic_events

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

    p = build_graph(json_stream(env, events + alice), cfg, None, json_stream(env, control))
    out = registry_sink(p.versions, cfg).union(p.dead)
    with out.execute_and_collect() as results:
        collected = [json.loads(r) for r in results]
    dead = [o for o in collected if "reason" in o]
    assert len(dead) == 1 and dead[0]["source"] == "control"
    assert "field 'action' must be 'forget'" in dead[0]["reason"]
    seen = max(o["events_seen"] for o in collected if "status" in o)
    assert seen == len(events) + 3


def test_a_user_over_the_rate_limit_has_the_excess_dead_lettered(make_cfg):
    """A bot sends 30 events in one window with user.max_events_per_window = 10: its first
    10 are learned, the other 20 go to the dead-letter topic with the reason, and nobody
    else loses an event."""
    from tests.flink.test_pipeline import run_on_collection

    cfg = make_cfg(
        "model.text_encoder='none'",
        "trainer.batch_size=32",
        "trainer.export_every_steps=10",
        "job.checkpoint_interval_ms=0",
        "user.max_events_per_window=10",
    )
    events = topic_events(1200)  # 500 ms apart: at most 2 events per user and window
    t = json.loads(events[600])["ts"]
    bot = [
        json.dumps(
            {"event_id": f"b{i:02d}", "user_id": "bot", "item_id": "t0_1", "type": "click", "ts": t}
        ).encode()
        for i in range(30)
    ]
    out = run_on_collection(cfg, events[:600] + bot + events[600:])
    dead = [o for o in out if "reason" in o]
    assert len(dead) == 20
    assert all(d["reason"].startswith("user rate limit") for d in dead)
    assert sorted(d["payload"].split()[0] for d in dead) == sorted(
        f"event_id=b{i:02d}" for i in range(10, 30)
    )
    assert max(o["events_seen"] for o in out if "status" in o) == len(events) + 10
