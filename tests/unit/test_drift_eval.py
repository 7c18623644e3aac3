"""Taste drift in the synthetic stream, through `rtrec eval`'s path: the online model
recovers after the drift, its copy frozen at the drift point does not, and the Page-Hinkley
detector on the prequential loss fires after the drift point."""

import pytest

from offline.evaluate import run_eval
from offline.stream import to_stream
from replay.datasets import synthetic

DRIFT_AT = 2500  # event index: every user's taste moves and every topic's items reshuffle


@pytest.mark.slow
def test_online_model_recovers_from_drift_and_the_detector_fires(make_cfg):
    cfg = make_cfg(
        "model.text_encoder='none'",
        "model.dim=16",
        "model.history_length=8",
        # Users here come back to items they had before the drift (120 items): ranking
        # excludes only what the towers read, as for a catalogue with repeat consumption.
        "user.known_items=0",
        "trainer.batch_size=32",
        "trainer.drift_delta=0.01",
        "trainer.drift_threshold=1.5",
        "trainer.drift_min_samples=30",
        "replay.num_users=150",
        "replay.num_items=120",
        f"replay.num_events={2 * DRIFT_AT}",
        f"replay.drift_every_events={DRIFT_AT}",
        "replay.drift_fraction=1.0",
        "replay.drift_reshuffle=true",
        "replay.new_items_midstream=0",
        "replay.malformed_fraction=0.0",
    )
    records = list(synthetic(cfg.replay))
    drift_ts = [r.ts for r in records if r.topic == "events"][DRIFT_AT]
    # One sample per event here, so a warm-up of 1/2 ends exactly at the drift: "frozen" is
    # the model as it stood when the stream changed; the test part is the post-drift stream.
    res = run_eval(
        cfg, to_stream(records, cfg), warmup=0.5, n_buckets=5, progress=False, baselines=[]
    )
    assert res["warmup_samples"] == DRIFT_AT
    online = res["models"]["online"]
    frozen = res["models"]["frozen"]
    r_on = [b["recall@10"] for b in online["per_bucket"]]
    r_fr = [b["recall@10"] for b in frozen["per_bucket"]]
    # A clear gap over the post-drift part, widest once the online model has re-learned.
    assert online["overall"]["recall@10"] > frozen["overall"]["recall@10"] + 0.04, (r_on, r_fr)
    assert sum(r_on[-2:]) / 2 > sum(r_fr[-2:]) / 2 + 0.04, (r_on, r_fr)
    # Recovery: right after the drift the online model is hit too, then climbs back.
    assert sum(r_on[-2:]) / 2 > r_on[0] + 0.03, r_on
    # The detector fires after the drift point, within the first fifth of the new regime,
    # and never on the stationary stretch before it.
    det = res["drift"]["detections"]
    assert det, res["drift"]
    assert all(d["event_time_ms"] >= drift_ts for d in det), (drift_ts, det)
    assert det[0]["test_positive"] < res["test_positives"] / 5, det
    assert res["drift"]["online"]["detections"] == len(det)
