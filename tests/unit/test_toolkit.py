"""Training toolkit: losses, EMA, dropout, clipping, L2, id admission and expiry."""

import numpy as np
import pytest
import torch

from models.config import ModelConfig, TrainerConfig
from models.export import build_version
from models.history import Sample
from models.metrics import prequential_step
from models.registry import publish
from models.serving import OnnxRecommender
from models.trainer import OnlineLearner, new_meta
from tests.unit.helpers import topic_samples

MC = ModelConfig(dim=16, history_length=8, hidden=32, max_items=500)
CPU = torch.device("cpu")


def train(learner, data, batch=32):
    meta = new_meta("m")
    for i in range(0, len(data), batch):
        prequential_step(learner, meta, data[i : i + batch])
    return meta


@pytest.mark.parametrize(
    ("loss", "lr"), [("sampled_softmax", 0.1), ("bpr", 0.3), ("adaptive_softmax", 0.5)]
)
def test_every_loss_learns(loss, lr):
    cfg = TrainerConfig(loss=loss, lr=lr, adaptive_cutoffs=(20,))
    meta = train(OnlineLearner(MC, cfg, CPU), topic_samples(6000))
    assert meta["recall10_ema"] > 0.25, meta  # chance is 0.1


def test_adaptive_softmax_export_matches_torch(tmp_path):
    learner = OnlineLearner(MC, TrainerConfig(loss="adaptive_softmax", adaptive_cutoffs=(20,)), CPU)
    meta = train(learner, topic_samples(2000))
    mv = build_version(learner, meta, 10, {})
    assert mv.manifest["scoring"] == "adaptive_softmax"
    rec = OnnxRecommender(publish(tmp_path, mv) / "model.onnx")
    ids, mask = rec.encode([["t1_1", "t1_2"], ["t3_3"]])
    _, o_scores = rec.raw(ids, mask)
    # Reference: log p(item | user) from the learner itself, best first.
    hist_idx = torch.tensor([[learner.catalog.index[x] for x in ["t1_2", "t1_1"]] + [0] * 6])
    with torch.no_grad():
        learner.model.eval()
        user = learner.model.user_vectors(learner.item_vectors(hist_idx), (hist_idx > 0).float())
        scores = learner.score_all(user)
        scores.scatter_(1, hist_idx, -np.inf)
        scores[:, 0] = -np.inf
        ref = torch.topk(scores, 10).values.numpy()
    np.testing.assert_allclose(o_scores[0], ref[0], atol=1e-5)


def test_ema_weights_are_exported():
    cfg = TrainerConfig(ema_decay=0.5, optimizer="sgd", lr=0.5)
    learner = OnlineLearner(MC, cfg, CPU)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    learner.learn(topic_samples(32), new_meta("m"))
    after = learner.model.state_dict()
    exported = learner.export_model().state_dict()
    w = "user_tower.mlp2.weight"  # (mlp1 gets no gradient while mlp2 is still zero)
    assert not torch.equal(before[w], after[w])
    torch.testing.assert_close(exported[w], 0.5 * before[w] + 0.5 * after[w])


def test_dropout_only_in_training():
    learner = OnlineLearner(
        ModelConfig(dim=16, history_length=8, hidden=32, dropout=0.5), TrainerConfig(), CPU
    )
    tower = learner.model.user_tower
    torch.nn.init.normal_(tower.mlp2.weight)  # starts at zero, which would hide the dropout
    x, m = torch.randn(4, 8, 16), torch.ones(4, 8)
    tower.train()
    assert not torch.equal(tower(x, m), tower(x, m))
    tower.eval()
    assert torch.equal(tower(x, m), tower(x, m))


def test_gradient_clipping_bounds_the_dense_step():
    cfg = TrainerConfig(optimizer="sgd", lr=1.0, grad_clip=1e-3)
    learner = OnlineLearner(MC, cfg, CPU)
    before = [p.detach().clone() for p in learner.model.parameters()]
    learner.learn(topic_samples(64), new_meta("m"))
    moved = torch.sqrt(
        sum(((p - b) ** 2).sum() for p, b in zip(learner.model.parameters(), before, strict=True))
    )
    assert 0 < float(moved) <= 1e-3 + 1e-6


def test_l2_shrinks_rows():
    norms = []
    for l2 in (0.0, 1.0):
        learner = OnlineLearner(MC, TrainerConfig(optimizer="sgd", lr=0.1, l2=l2), CPU)
        train(learner, topic_samples(1000))
        norms.append(float(learner.table.embeddings().norm()))
    assert norms[1] < norms[0]


def test_admission_threshold_keeps_rare_items_text_only():
    mc = ModelConfig(dim=8, history_length=4, hidden=8, admission_threshold=3)
    learner = OnlineLearner(mc, TrainerConfig(), CPU)
    meta = new_meta("m")
    s = [Sample("m", "u", (), "rare", 1, 1.0, t, f"e{t}") for t in range(3)]
    learner.learn(s[:2], meta)
    assert "rare" in learner.catalog.index and "rare" not in learner.table.index
    learner.learn(s[2:], meta)
    assert "rare" in learner.table.index


def test_expiry_keeps_id_rows_bounded_under_item_churn():
    """A long stream whose items keep changing: rows of items nobody touches any more
    expire, so the id table (and its state) stays far below the number of items seen."""
    mc = ModelConfig(dim=8, history_length=4, hidden=8, max_items=300, expiry_ms=20_000)
    learner = OnlineLearner(mc, TrainerConfig(batch_size=32), CPU)
    meta = new_meta("m")
    state: dict[str, bytes] = {}
    rng = np.random.default_rng(0)
    max_rows, seen = 0, set()
    for step in range(600):  # every 50 steps a new generation of 60 items replaces the old one
        gen = step // 50
        batch = []
        for j in range(32):
            items = [f"g{gen}_{i}" for i in rng.integers(0, 60, size=4)]
            ts = step * 1000 + j
            batch.append(Sample("m", "u", tuple(items[:3]), items[3], 1, 1.0, ts, f"{step}-{j}"))
            seen.update(items)
        r = learner.learn(batch, meta)
        state.update(r.touched_rows)
        for k in r.removed_rows:
            state.pop(k)
        max_rows = max(max_rows, len(learner.table))
        assert set(state) == set(learner.table.index)  # state mirrors the cache exactly
    assert len(seen) == 720
    assert max_rows <= 2 * 60 + 10  # about two generations alive at a time, not 720
    assert meta["expired_rows"] > 400 and meta["oov"] == 0


def test_adaptive_softmax_classes_follow_frequency():
    """Classes grow with the catalogue and are re-sorted by frequency; rows move with items."""
    cfg = TrainerConfig(loss="adaptive_softmax", adaptive_cutoffs=(8,), adaptive_resort_steps=10**9)
    learner = OnlineLearner(MC, cfg, CPU)
    meta = new_meta("m")
    rng = np.random.default_rng(1)
    data = []
    for k in range(3000):  # item "p{j}" drawn with probability ~ 1 / (j + 1): rare ones first
        j = int(min(rng.zipf(1.3), 40)) - 1
        data.append(Sample("m", "u", ("p0",), f"p{39 - j}", 1, 1.0, k, str(k)))
    for i in range(0, 3000, 64):
        learner.learn(data[i : i + 64], meta)
    cat, asm = learner.catalog, learner.asm
    live = np.array(sorted(cat.index.values()))
    assert sorted(cat.asm_class[live].tolist()) == list(range(len(live)))  # grew densely
    head_before = {
        cat.ids[i]: asm.head.weight[cat.asm_class[i]].clone() for i in live if cat.asm_class[i] < 8
    }
    from models.adaptive import resort_by_frequency

    assert resort_by_frequency(asm, learner.opt, cat) > 0
    by_class = sorted(live, key=lambda i: cat.asm_class[i])
    counts = [int(cat.count[i]) for i in by_class]
    assert counts == sorted(counts, reverse=True)  # class order = frequency order
    for i in live:
        item = cat.ids[i]
        if item in head_before and cat.asm_class[i] < 8:  # stayed in the head: row moved along
            assert torch.equal(asm.head.weight[cat.asm_class[i]], head_before[item])
