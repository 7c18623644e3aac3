"""Prequential metrics (models/metrics.py) and the Page-Hinkley drift detector (models/drift.py)."""

import copy
import math
import random

import pytest
import torch

from models.config import ModelConfig, TrainerConfig
from models.drift import PageHinkley
from models.export import build_version
from models.history import Sample
from models.metrics import (
    TensorBoardLog,
    metrics_record,
    positives,
    prequential_step,
    rank_sums,
    summary,
)
from models.trainer import OnlineLearner, new_meta
from tests.unit.helpers import topic_samples

MC = ModelConfig(dim=16, history_length=8, hidden=32, text_encoder="none")
CPU = torch.device("cpu")


def test_rank_sums_follow_the_definitions():
    s = rank_sums([1, 3, 11, 2, 10], k=10)
    assert (s.n, s.hits) == (5, 4)
    assert s.ndcg == pytest.approx(1 + 1 / math.log2(4) + 1 / math.log2(3) + 1 / math.log2(11))
    assert s.rr == pytest.approx(1 + 1 / 3 + 1 / 11 + 1 / 2 + 1 / 10)
    d = s.as_dict(10)
    assert d["recall@10"] == pytest.approx(0.8) and d["mrr"] == pytest.approx(s.rr / 5)


def test_step_ranks_with_the_weights_before_the_update():
    learner = OnlineLearner(MC, TrainerConfig(batch_size=32), CPU)
    meta = new_meta("m")
    data = topic_samples(640)
    for i in range(0, 320, 32):
        prequential_step(learner, meta, data[i : i + 32])
    batch = data[320:352]
    low = Sample("m", "u", ("t0_1",), "t0_2", 0, 0.0, 9, "neg")  # label 0: not ranked
    before = copy.deepcopy(learner)
    hits_before = meta["prequential"]["hits"]
    out = prequential_step(learner, meta, [*batch, low])
    assert out.ranks == before.rank_targets(batch)
    assert learner.rank_targets(batch) != out.ranks  # the step changed the model
    assert out.loss is not None and math.isfinite(out.loss)
    p = meta["prequential"]
    assert p["n"] == 352 and p["batches"] == 11 and p["loss_batches"] == 11
    assert p["hits"] == hits_before + sum(r <= 10 for r in out.ranks)
    assert meta["recall10_ema"] == p["ema"]["recall"]


def test_metrics_are_deterministic_and_reach_the_manifest():
    def run():
        learner = OnlineLearner(MC, TrainerConfig(batch_size=32), CPU)
        meta = new_meta("m")
        records = []
        data = topic_samples(3000)
        for i in range(0, len(data), 32):
            records.append(metrics_record(meta, prequential_step(learner, meta, data[i : i + 32])))
        return learner, meta, records

    learner, meta, records = run()
    assert run()[2] == records  # bit-identical, floats included
    last = records[-1]
    assert last["cumulative"]["n"] == 3000 == sum(r["batch"]["n"] for r in records)
    assert last["cumulative"]["hits"] == sum(r["batch"]["hits"] for r in records)
    # 100 items in 5 topics: chance Recall@10 is ~0.1, the topic alone gives up to 0.5.
    assert last["recent"]["recall@10"] > 0.25
    assert last["recent"]["recall@10"] > last["cumulative"]["recall@10"]  # it learned
    manifest = build_version(learner, meta, 10, {}).manifest
    assert manifest["metrics"]["prequential"] == summary(meta)
    assert manifest["metrics"]["prequential_recall10_ema"] == last["recent"]["recall@10"]


def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = OnlineLearner(MC, TrainerConfig(batch_size=32), CPU)
    meta = new_meta("m")
    log = TensorBoardLog(str(tmp_path))
    data = topic_samples(320)
    for i in range(0, len(data), 32):
        log.write(metrics_record(meta, prequential_step(learner, meta, data[i : i + 32])))
    log.close()
    acc = EventAccumulator(str(tmp_path / "m"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"batch/recall@10", "cumulative/ndcg@10", "recent/mrr", "recent/loss"} <= tags
    cum = acc.Scalars("cumulative/recall@10")
    assert [e.step for e in cum] == list(range(1, 11))
    assert cum[-1].value == pytest.approx(summary(meta)["cumulative"]["recall@10"], rel=1e-6)


# ----------------------------------------------------------------------------- drift
def noisy(rng, n, mean):
    return [mean + rng.gauss(0, 0.1) for _ in range(n)]


def test_page_hinkley_quiet_on_a_stationary_or_falling_loss():
    rng = random.Random(0)
    ph = PageHinkley(delta=0.01, threshold=2.0, min_samples=20)
    assert not any(ph.update(x) for x in noisy(rng, 3000, 1.0))
    falling = [3.0 * math.exp(-i / 300) + rng.gauss(0, 0.1) for i in range(3000)]
    ph = PageHinkley(delta=0.01, threshold=2.0, min_samples=20)
    assert not any(ph.update(x) for x in falling)


def test_page_hinkley_fires_soon_after_an_upward_shift_and_restarts():
    rng = random.Random(1)
    ph = PageHinkley(delta=0.01, threshold=2.0, min_samples=20)
    fired = [i for i, x in enumerate(noisy(rng, 500, 1.0) + noisy(rng, 500, 1.5)) if ph.update(x)]
    assert fired and 500 <= fired[0] < 520, fired
    assert ph.n < 500  # restarted at the detection


def test_page_hinkley_waits_for_min_samples():
    ph = PageHinkley(delta=0.0, threshold=0.5, min_samples=10)
    fired = [i for i, x in enumerate([0.0, 5.0, 5.0, 5.0] + [9.0] * 10) if ph.update(x)]
    assert fired and fired[0] == 9


def test_page_hinkley_state_round_trip_is_exact():
    rng = random.Random(2)
    xs = noisy(rng, 300, 1.0) + noisy(rng, 300, 1.4)
    a = PageHinkley(delta=0.01, threshold=2.0, min_samples=20)
    out_a = [a.update(x) for x in xs]
    b = PageHinkley(delta=0.01, threshold=2.0, min_samples=20)
    out_b = [b.update(x) for x in xs[:400]]
    c = PageHinkley.from_state(copy.deepcopy(b.as_state()), 0.01, 2.0, 20)
    out_b += [c.update(x) for x in xs[400:]]
    assert out_a == out_b and any(out_a)
    assert c.as_state() == a.as_state()
    with pytest.raises(ValueError, match="drift detector state has format 9"):
        PageHinkley.from_state({**a.as_state(), "format": 9}, 0.01, 2.0, 20)


def test_detection_counts_and_boosts_the_learning_rate():
    # threshold < 0: every step after min_samples is a "detection" (exercises the plumbing).
    cfg = TrainerConfig(
        batch_size=32,
        lr=0.05,
        drift_threshold=-1.0,
        drift_min_samples=3,
        drift_lr_boost=4.0,
        drift_boost_steps=2,
    )
    learner = OnlineLearner(MC, cfg, CPU)
    meta = new_meta("m")
    data = topic_samples(32 * 6)
    lrs, fired = [], []
    for i in range(6):
        out = prequential_step(learner, meta, data[32 * i : 32 * i + 32])
        lrs.append(learner.opt.param_groups[0]["lr"])
        fired.append(out.drift_detected)
    assert fired == [False, False, True, False, False, True]
    assert lrs == pytest.approx([0.05, 0.05, 0.05, 0.2, 0.2, 0.05])
    assert learner.lr_scale == 1.0
    s = summary(meta)["drift"]
    assert s["detections"] == 2 and s["last_step"] == 6 and s["boost_steps_left"] == 2
    rec = metrics_record(meta, out)
    assert rec["batch"]["drift_detected"] is True and rec["drift"]["detections"] == 2


def test_drift_detection_can_be_disabled():
    cfg = TrainerConfig(batch_size=32, drift_enabled=False, drift_threshold=-1.0)
    learner = OnlineLearner(MC, cfg, CPU)
    meta = new_meta("m")
    data = topic_samples(32 * 40)
    for i in range(40):
        prequential_step(learner, meta, data[32 * i : 32 * i + 32])
    assert summary(meta)["drift"]["detections"] == 0 and "drift" not in meta


def test_positives_are_label_one_with_weight():
    s = topic_samples(3)
    zero = Sample("m", "u", (), "x", 1, 0.0, 1, "z")
    neg = Sample("m", "u", (), "x", 0, 1.0, 1, "n")
    assert positives([*s, zero, neg]) == s
