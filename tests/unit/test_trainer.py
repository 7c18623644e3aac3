import math
import pickle

import pytest
import torch

from models.config import ModelConfig, TrainerConfig
from models.history import Sample
from models.metrics import prequential_step
from models.trainer import OnlineLearner, new_meta
from tests.unit.helpers import topic_samples

MC = ModelConfig(dim=16, history_length=8, hidden=32)


class StateStore:
    """What the Flink trainer keeps in state, as plain Python."""

    def __init__(self):
        self.rows: dict[str, bytes] = {}
        self.items: dict[str, bytes] = {}
        self.dense: bytes | None = None
        self.meta = new_meta("m")

    def apply(self, result):
        self.rows.update(result.touched_rows)
        self.items.update(result.touched_items)
        for k in result.removed_rows:
            self.rows.pop(k, None)
        for k in result.removed_items:
            self.items.pop(k, None)
        if result.dense_blob is not None:
            self.dense = result.dense_blob


def run(learner, store, samples, batch=32):
    for i in range(0, len(samples), batch):
        learner.ensure_loaded(
            store.meta, lambda: store.dense, lambda: store.rows.items(), lambda: store.items.items()
        )
        store.apply(prequential_step(learner, store.meta, samples[i : i + batch]).result)


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd", "adam"])
def test_learning_beats_chance(optimizer):
    lr = {"adagrad": 0.1, "sgd": 0.5, "adam": 0.01}[optimizer]
    learner = OnlineLearner(
        MC, TrainerConfig(optimizer=optimizer, lr=lr, batch_size=32), torch.device("cpu")
    )
    store = StateStore()
    run(learner, store, topic_samples(6000))
    # 100 items in 5 topics: chance recall@10 is 0.1; knowing the topic gives up to 0.5.
    assert store.meta["recall10_ema"] > 0.25, store.meta
    assert store.meta["events_seen"] == 6000 and store.meta["step"] == 6000 // 32 + 1


def test_full_softmax_learns_and_writes_only_the_steps_rows():
    cfg = TrainerConfig(loss="full_softmax", lr=0.1, batch_size=32, num_negatives=4)
    learner, store = OnlineLearner(MC, cfg, torch.device("cpu")), StateStore()
    run(learner, store, topic_samples(6000))
    assert store.meta["recall10_ema"] > 0.25, store.meta
    # Every item is in each step's softmax, but only the step's id rows are written.
    s = Sample("m", "u", ("t0_1",), "t0_2", 1, 1.0, 5, "x")
    result = learner.learn([s], store.meta)
    assert {"t0_1", "t0_2"} <= set(result.touched_rows)
    assert len(result.touched_rows) <= 2 + 4 < len(learner.table)


def test_restore_from_state_is_exact():
    """A learner rebuilt from state continues exactly like the one that never stopped."""
    cfg = TrainerConfig(batch_size=32)
    data = topic_samples(1200)
    a, store_a = OnlineLearner(MC, cfg, torch.device("cpu")), StateStore()
    run(a, store_a, data[:600])
    # "Restart": a brand-new learner sees only the state (a copy of it).
    store_b = StateStore()
    store_b.rows, store_b.items = dict(store_a.rows), dict(store_a.items)
    # meta goes through pickle like Flink state (it holds nested metrics dicts).
    store_b.dense, store_b.meta = store_a.dense, pickle.loads(pickle.dumps(store_a.meta))
    b = OnlineLearner(MC, cfg, torch.device("cpu"))
    run(a, store_a, data[600:])
    run(b, store_b, data[600:])
    assert store_a.rows == store_b.rows
    assert store_a.items == store_b.items
    assert store_a.meta == store_b.meta
    for (ka, va), (kb, vb) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert ka == kb and torch.equal(va, vb)


def test_same_input_gives_byte_identical_state():
    cfg = TrainerConfig(batch_size=16)
    data = topic_samples(400, seed=3)
    stores = []
    for _ in range(2):
        s = StateStore()
        run(OnlineLearner(MC, cfg, torch.device("cpu")), s, data, batch=16)
        stores.append(s)
    assert stores[0].rows == stores[1].rows
    assert stores[0].dense == stores[1].dense


def test_only_touched_rows_are_returned():
    learner = OnlineLearner(MC, TrainerConfig(num_negatives=4), torch.device("cpu"))
    meta = new_meta("m")
    learner.learn(topic_samples(200), meta)  # creates ~100 rows
    s = Sample("m", "u", ("t0_1",), "t0_2", 1, 1.0, 5, "x")
    result = learner.learn([s], meta)
    assert {"t0_1", "t0_2"} <= set(result.touched_rows)
    assert len(result.touched_rows) <= 2 + 4
    assert len(learner.table) > 50


def test_non_finite_step_is_skipped_and_counted():
    learner = OnlineLearner(MC, TrainerConfig(lr=0.1), torch.device("cpu"))
    meta = new_meta("m")
    learner.learn(topic_samples(64), meta)
    before = learner.table.data[: len(learner.table.ids)].clone()
    with torch.no_grad():
        learner.model.user_tower.cold.fill_(math.inf)
        learner.model.user_tower.mlp1.weight.fill_(math.nan)
    result = learner.learn(topic_samples(64, seed=9), meta)
    assert result.skipped_non_finite and meta["non_finite_skips"] == 1
    # Existing rows are untouched; only rows created for new ids go to state.
    n_old = before.shape[0]
    assert torch.equal(learner.table.data[:n_old], before)


def test_vocabulary_capacity_bounds_rows():
    learner = OnlineLearner(
        ModelConfig(dim=8, history_length=4, hidden=8, max_items=10),
        TrainerConfig(),
        torch.device("cpu"),
    )
    meta = new_meta("m")
    learner.learn(topic_samples(300), meta)
    assert len(learner.table) == 10
    assert meta["oov"] > 0


def test_label_zero_samples_are_counted_not_learned():
    learner = OnlineLearner(MC, TrainerConfig(), torch.device("cpu"))
    meta = new_meta("m")
    r = learner.learn([Sample("m", "u", (), "a", 0, 0.0, 7, "x")], meta)
    assert meta["events_seen"] == 1 and meta["step"] == 0 and r.touched_rows == {}
    assert meta["hwm_ts"] == 7


def test_steps_grow_while_the_trainer_is_behind_its_input():
    """Catch-up steps: batch_size samples make a step while the trainer keeps up (it has
    waited longer than its last step took); while samples arrive faster, the step waits
    for up to catchup_factor x batch_size, or until the wait outgrows a step."""
    from models.online import step_due

    cfg = TrainerConfig(batch_size=64, catchup_factor=4)
    assert not step_due(63, cfg, idle_s=9.0, last_step_s=0.0)  # never below batch_size
    assert step_due(64, cfg, idle_s=0.0, last_step_s=0.0)  # first step: keeping up
    assert step_due(64, cfg, idle_s=0.5, last_step_s=0.03)  # live rate
    assert not step_due(64, cfg, idle_s=0.01, last_step_s=0.03)  # a backlog: wait
    assert not step_due(255, cfg, idle_s=0.02, last_step_s=0.03)
    assert step_due(130, cfg, idle_s=0.04, last_step_s=0.03)  # waited longer than a step
    assert step_due(256, cfg, idle_s=0.0, last_step_s=0.03)  # the largest step
    fixed = TrainerConfig(batch_size=64, catchup_factor=1)
    assert step_due(64, fixed, idle_s=0.0, last_step_s=1.0)


def test_catalogue_horizon_follows_the_events_learned_unless_deterministic():
    """Catalogue records take effect at the watermark or, outside deterministic mode, at
    the newest event time already learned (the watermark can stand still under load)."""
    from models.online import catalogue_horizon

    meta = new_meta("m")
    assert catalogue_horizon(-(2**63), meta, deterministic=False) == 0
    meta["hwm_ts"] = 1_700_000_000_000
    assert catalogue_horizon(-(2**63), meta, deterministic=False) == 1_700_000_000_000
    assert catalogue_horizon(1_800_000_000_000, meta, deterministic=False) == 1_800_000_000_000
    assert catalogue_horizon(-(2**63), meta, deterministic=True) == -(2**63)


def _head_loss_by_definition(blended, excluded, targets, temperature, head):
    """The blend's head loss as defined: per sample, cross-entropy over the whole catalogue
    with everything but its `head` best non-excluded items and its target masked out;
    0 for a sample whose target is not among its `head` best."""
    logits = blended / temperature
    excluded = excluded.clone()
    excluded.scatter_(1, targets.unsqueeze(1), False)
    logits = logits.masked_fill(excluded, -1e9)
    with torch.no_grad():
        t_logit = logits.gather(1, targets.unsqueeze(1))
        in_head = ((logits > t_logit).sum(dim=1) < head).to(logits.dtype)
        top = torch.topk(logits, min(head, logits.shape[1]), dim=1).indices
        keep = torch.zeros_like(excluded).scatter(1, top, True)
        keep.scatter_(1, targets.unsqueeze(1), True)
    ce = torch.nn.functional.cross_entropy(
        logits.masked_fill(~keep, -1e9), targets, reduction="none"
    )
    return ce * in_head


@pytest.mark.parametrize(("n", "head"), [(2000, 100), (50, 100), (300, 10)])
def test_the_head_loss_is_the_masked_catalogue_softmax_computed_over_the_head(n, head):
    """_head_loss works on the counted samples' [head + 1] logits only; the values and the
    gradients must be those of the masked whole-catalogue cross-entropy. Covered: targets
    inside and outside the head, excluded items, fewer live items than the head (n=50)."""
    torch.manual_seed(n)
    learner = OnlineLearner(MC, TrainerConfig(blend_head=head))
    b = 64
    base = torch.randn(b, n)
    excluded = torch.rand(b, n) < 0.05
    excluded[:, 0] = True
    targets = torch.randint(1, n, (b,))
    targets[:8] = base[:8].argmax(dim=1).clamp(min=1)  # some targets at the very top
    excluded[torch.arange(8), targets[:8]] = True  # (a target competes even if excluded)
    results = []
    for loss in (
        lambda x: _head_loss_by_definition(x, excluded, targets, learner.cfg.temperature, head),
        lambda x: learner._head_loss(x, x.detach().masked_fill(excluded, -math.inf), targets),
    ):
        w = torch.ones(n, requires_grad=True)
        values = loss(base * w)
        values.sum().backward()
        results.append((values.detach(), w.grad))
    (want, want_grad), (got, got_grad) = results
    assert (want > 0).sum() >= 8 and (want == 0).sum() >= (1 if head < n else 0)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-3)


def test_a_blend_head_of_0_is_the_softmax_over_the_whole_masked_catalogue():
    """trainer.blend_head = 0: every sample counts, over every item in play + its target."""
    torch.manual_seed(3)
    learner = OnlineLearner(MC, TrainerConfig(blend_head=0))
    base = torch.randn(16, 40, requires_grad=True)
    excluded = torch.rand(16, 40) < 0.2
    excluded[:, 0] = True
    targets = torch.randint(1, 40, (16,))
    excluded[torch.arange(4), targets[:4]] = True  # (a target competes even if excluded)
    got = learner._head_loss(base, base.detach().masked_fill(excluded, -math.inf), targets)
    t = learner.cfg.temperature
    for i in range(16):
        in_play = ~excluded[i]
        in_play[targets[i]] = True
        want = -torch.log_softmax(base[i][in_play] / t, dim=0)[
            in_play[: targets[i]].sum()
        ]  # the target's position among the items in play
        assert torch.allclose(got[i], want, rtol=1e-5, atol=1e-5)


def test_a_step_reuses_the_histories_it_was_ranked_with_and_learns_the_same(monkeypatch):
    """learn() takes the ranked positives' histories from rank_batch (one history batch a
    step instead of two) when every positive was ranked and no item is new; the model
    is byte-identical to recomputing them."""
    data = topic_samples(1500)
    calls = []
    real = OnlineLearner._history_batch

    def counting(self, samples):
        calls.append(len(samples))
        return real(self, samples)

    monkeypatch.setattr(OnlineLearner, "_history_batch", counting)
    rank = OnlineLearner.rank_batch

    def no_hist(self, samples, for_learning=True):
        ranks, ranked = rank(self, samples, for_learning)
        if ranked is not None:
            ranked.hist = None
        return ranks, ranked

    states = {}
    for reuse in (True, False):
        if not reuse:  # rank_batch's histories withheld: learn() recomputes them
            monkeypatch.setattr(OnlineLearner, "rank_batch", no_hist)
        calls.clear()
        learner = OnlineLearner(MC, TrainerConfig(batch_size=32), torch.device("cpu"))
        store = StateStore()
        run(learner, store, data)
        states[reuse] = (store.dense, sorted(store.rows.items()), len(calls))
    steps = len(data) // 32 + 1
    assert states[True][:2] == states[False][:2]
    # Without reuse: two history batches a step (rank, learn) after the first step.
    assert states[False][2] >= 2 * steps - 2
    # With it: one, except in steps whose batch brought a new item (the first few).
    assert states[True][2] < steps + 20
