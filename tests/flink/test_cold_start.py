"""Cold start through the real job: an item known only from the catalogue stream (text)
is recommended to users of its topic and not to others."""

from __future__ import annotations

import json
import random

from pyflink.common import Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner

from flink_job.job import build_pipeline, make_env, registry_sink
from models.registry import list_versions
from models.serving import OnnxRecommender
from replay.datasets import START_TS_MS, TOPICS, synthetic

NEW_ITEM = {
    "item_id": "brand-new",
    "title": "Bebop saxophone",
    "text": "A jazz piece about bebop, saxophone and trumpet.",
    "categories": ["jazz"],
}


class JsonTs(TimestampAssigner):
    def extract_timestamp(self, value, record_timestamp):
        return int(json.loads(value)["ts"])


def as_stream(env, payloads: list[bytes]):
    return (
        env.from_collection([p.decode("latin-1") for p in payloads], type_info=Types.STRING())
        .map(lambda s: s.encode("latin-1"), output_type=Types.PRIMITIVE_ARRAY(Types.BYTE()))
        .assign_timestamps_and_watermarks(
            WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(JsonTs())
        )
    )


def test_new_item_is_recommended_from_its_text(make_cfg, tiny_bert_dir, tmp_path):
    cfg = make_cfg(
        f"model.text_encoder='{tiny_bert_dir}'",
        "model.dim=16",
        "model.history_length=8",
        # Users here come back to items they had (120 items, 6,000 events): ranking
        # excludes only what the towers read, as for a catalogue with repeat consumption.
        "user.known_items=0",
        "model.hidden=32",
        # 120 items in 3 topics: counting all 8 pairs of each positive soon links every
        # same-topic pair, and the memory's scores then swamp what the text says about a
        # new item (with 8 pairs: 11 of 20 jazz users in the first version
        # that knows it, and one cooking user later). 3 pairs keep this test about text.
        "model.transition_pairs=3",
        "trainer.batch_size=64",
        "trainer.export_every_steps=20",
        "trainer.export_every_seconds=3600.0",
        "job.checkpoint_interval_ms=0",
        "replay.num_events=6000",
        "replay.num_items=120",
        "replay.new_items_midstream=0",
        "replay.malformed_fraction=0.0",
        "replay.drift_every_events=0",
        # Reproducible batches (event-time order), so the outcome does not depend on timing.
        "trainer.deterministic=true",
    )
    records = list(synthetic(cfg.replay))
    events = [r.value for r in records if r.topic == "events"]
    items = [r.value for r in records if r.topic == "items"]
    new_ts = json.loads(events[len(events) // 2])["ts"]
    items.append(json.dumps({**NEW_ITEM, "ts": new_ts}).encode())
    assert not any(b"brand-new" in e for e in events)

    env = make_env(cfg)
    versions, dead = build_pipeline(as_stream(env, events), cfg, as_stream(env, items))
    with registry_sink(versions, cfg).union(dead).execute_and_collect() as results:
        out = [json.loads(r) for r in results]
    assert not [o for o in out if "reason" in o]

    registry = tmp_path / "registry" / "default"
    with_new = []
    for name in list_versions(registry.parent, "default"):
        rec = OnnxRecommender(registry / name / "model.onnx")
        if "brand-new" in rec.index:
            with_new.append(rec)
    assert with_new, "no published version contains the catalogue-only item"

    by_topic = {
        t: [f"item{n}" for n in range(120) if n % len(TOPICS) == k] for k, t in enumerate(TOPICS)
    }
    rng = random.Random(3)
    for rec in with_new:  # every version from the one that first knows the item on
        hits = {}
        for topic in ("jazz", "space", "cooking"):
            histories = [rng.sample(by_topic[topic], 8) for _ in range(20)]
            tops = rec.recommend(histories, k=10)
            hits[topic] = sum("brand-new" in [i for i, _ in top] for top in tops)
        print("cold-start hits", rec.path.parent.name, hits)
        assert hits["jazz"] >= 14, hits  # same-topic users: in the top-10 (>= 70% of them)
        assert hits["space"] == 0 and hits["cooking"] == 0, hits
    assert new_ts > START_TS_MS
