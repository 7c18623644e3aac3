"""offline.stream.job_firings: the deterministic-mode trainer's firings without Flink."""

from models.events import Item
from models.history import Sample
from offline.stream import job_firings, to_stream
from replay.datasets import synthetic


def test_firings_cut_like_the_deterministic_trainer(make_cfg):
    cfg = make_cfg(
        "trainer.batch_size=40",
        "job.window_ms=5000",
        "job.pseudonymise=false",
        "replay.num_events=900",
        "replay.num_items=60",
        "replay.new_items_midstream=10",
    )
    records = list(synthetic(cfg.replay))
    firings = list(job_firings(records, cfg))
    w, bs = cfg.job.window_ms, cfg.trainer.batch_size

    def window_time(s):  # the window output's record timestamp
        return s.ts - s.ts % w + w - 1

    assert [f for _, _, f in firings] == [False] * (len(firings) - 1) + [True]
    batches = [s for _, s, _ in firings if s]
    assert all(len(b) == bs for b in batches[:-1]) and 0 < len(batches[-1]) <= bs
    flat = [s for b in batches for s in b]
    key = [(window_time(s), s.ts, s.user_id, s.event_id) for s in flat]
    assert key == sorted(key)
    # The same samples as the per-event offline path (one per valid event, no loss/dupes).
    reference = [x for x in to_stream(records, cfg) if isinstance(x, Sample)]
    assert sorted(s.event_id for s in flat) == sorted(s.event_id for s in reference)
    assert len(flat) == 900  # malformed records come on top of num_events
    # Catalogue records arrive once, before any batch whose time has passed their ts.
    catalogue = [x for x in to_stream(records, cfg) if isinstance(x, Item)]
    seen_items: list[str] = []
    for items, samples, _ in firings:
        seen_items += [it.item_id for it in items]
        if samples:
            due = {it.item_id for it in catalogue if it.ts <= window_time(samples[-1])}
            assert due <= set(seen_items)
    assert sorted(seen_items) == sorted(r.key.decode() for r in records if r.topic == "items")


def test_a_learner_rebuilt_from_state_makes_the_same_versions(make_cfg):
    """Everything the model needs is in the state the job checkpoints: dropping the
    in-memory learner every few firings (as a Flink restore does) changes no version."""
    from offline.stream import trainer_without_flink

    cfg = make_cfg(
        "trainer.deterministic=true",
        "model.text_encoder='none'",
        "model.dim=16",
        "trainer.batch_size=40",
        "trainer.export_every_steps=5",
        "replay.num_events=1500",
        "replay.num_items=80",
        "replay.new_items_midstream=10",
    )
    records = list(synthetic(cfg.replay))

    def made(run) -> list:  # the versions and the gate's decisions on them
        return [(v.name, v.manifest["publication"]) for v in run.versions]

    plain = made(trainer_without_flink(records, cfg))
    restored = made(trainer_without_flink(records, cfg, restore_every=3))
    assert len(plain) >= 5
    assert restored == plain
