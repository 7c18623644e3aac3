"""Sequence user tower + transition memory: learning, exact restore, ONNX equality."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from models.config import ModelConfig, TrainerConfig
from models.cooccurrence import FADE_SPAN
from models.cooccurrence import count_all as _count_all
from models.export import build_version
from models.history import Sample
from models.registry import publish
from models.serving import OnnxRecommender
from models.trainer import OnlineLearner, new_meta
from tests.unit.helpers import topic_samples
from tests.unit.test_trainer import StateStore, run

MC = ModelConfig(
    dim=16,
    history_length=8,
    hidden=32,
    user_tower="sequence",
    transition_slots=4,
    transition_half_life=1000,
)
# A short half-life: the restore and ONNX tests run across several count epochs.
MC_FADING = dataclasses.replace(MC, transition_half_life=20)
CPU = torch.device("cpu")


def chain(n: int, length: int = 30, users: int = 50) -> list[Sample]:
    """Every user walks the same item chain c0 -> c1 -> ... (a pure transition signal)."""
    out = []
    for i in range(n):
        u, step = i % users, i // users
        hist = tuple(f"c{j % length}" for j in range(max(0, step - 8), step))
        out.append(Sample("m", f"u{u}", hist, f"c{step % length}", 1, 1.0, i, f"e{i}"))
    return out


def test_memory_counts_transitions_and_a_stronger_neighbour_evicts_the_weakest():
    learner = OnlineLearner(
        ModelConfig(dim=8, history_length=4, hidden=8, transition_slots=2, transition_half_life=0),
        TrainerConfig(num_negatives=2),
        CPU,
    )
    meta = new_meta("m")
    s = lambda h, t, i: Sample("m", "u", h, t, 1, 1.0, i, f"e{i}")  # noqa: E731
    learner.learn([s((), "a", 0), s((), "b", 1), s((), "c", 2), s((), "d", 3)], meta)
    learner.learn([s(("a",), "b", 4), s(("a",), "b", 5), s(("a",), "c", 6)], meta)
    idx, cnt = learner.successors()
    a, b, c, d = (learner.catalog.index[x] for x in "abcd")
    row = dict(zip(idx[a].tolist(), cnt[a].tolist(), strict=True))
    assert row == {b: 2.0, c: 1.0}
    learner.learn([s(("a",), "d", 7)], meta)  # full: d is no stronger than c, not taken
    idx, cnt = learner.successors()
    assert dict(zip(idx[a].tolist(), cnt[a].tolist(), strict=True)) == {b: 2.0, c: 1.0}
    learner.learn([s(("a",), "d", 8), s(("a",), "d", 9)], meta)  # 2 > 1: d evicts c
    idx, cnt = learner.successors()
    assert dict(zip(idx[a].tolist(), cnt[a].tolist(), strict=True)) == {b: 2.0, d: 2.0}


@pytest.mark.parametrize("source", ["events", "positives"])
def test_the_memory_reads_the_history_source_and_ranking_leaves_out_the_context(source):
    mc = ModelConfig(
        dim=8, history_length=4, hidden=8, transition_slots=4, transition_half_life=0,
        transition_pairs=1, history_source=source,
    )  # fmt: skip
    learner = OnlineLearner(mc, TrainerConfig(num_negatives=2), CPU)
    meta = new_meta("m")

    def s(hist, ctx, t, i):
        return Sample("m", "u", hist, t, 1, 1.0, i, f"e{i}", ctx)

    learner.learn([s((), (), x, i) for i, x in enumerate("abcd")], meta)  # id rows
    # "b" was rated low after positive "a": it is the newest item of the context only.
    learner.learn([s(("a",), ("a", "b"), "c", 4)], meta)
    idx, cnt = learner.successors()
    a, b, c, d = (learner.catalog.index[x] for x in "abcd")
    newest = b if source == "events" else a
    counted = {r: {int(j) for j, n in zip(idx[r], cnt[r], strict=True) if n > 0} for r in (a, b)}
    assert counted[newest] == {c}
    assert counted[a if newest == b else b] == set()
    # Either way, ranking never offers an item of the context, low-rated ones included.
    scores = learner.score_histories([s(("a",), ("a", "b"), "d", 5)])[0]
    assert torch.isinf(scores[a]) and torch.isinf(scores[b])
    assert torch.isfinite(scores[c]) and torch.isfinite(scores[d])


def test_counts_fade_by_half_life_across_epochs():
    """A count halves every ``transition_half_life`` learned positives, also once the clock
    has passed several count epochs (FADE_SPAN half-lives each), and the faded count
    decides which slot a new neighbour takes."""
    learner = OnlineLearner(
        ModelConfig(dim=8, history_length=4, hidden=8, transition_slots=2, transition_half_life=4),
        TrainerConfig(num_negatives=2),
        CPU,
    )
    meta = new_meta("m")
    n = iter(range(10_000))
    s = lambda h, t: Sample("m", "u", h, t, 1, 1.0, next(n), f"e{next(n)}")  # noqa: E731

    def filler(k: int) -> None:  # k positives without history: the clock moves, no counts
        learner.learn([s((), f"f{next(n) % 50}") for _ in range(k)], meta)

    def row(item: str) -> dict[str, float]:
        idx, cnt = learner.successors()
        cat = learner.catalog
        at = cat.index[item]
        return {
            cat.ids[j]: c for j, c in zip(idx[at].tolist(), cnt[at].tolist(), strict=True) if c > 0
        }

    learner.learn([s((), "a")], meta)  # "a" gets an id row, which holds its memory
    filler(3)
    learner.learn([s(("a",), "b")], meta)
    assert row("a") == {"b": pytest.approx(1.0)}
    filler(4)  # one half-life
    assert row("a") == {"b": pytest.approx(0.5)}
    filler(8 * FADE_SPAN)  # two epochs later: 2^-(1 + 2 * FADE_SPAN)
    learner.learn([s(("a",), "c")], meta)  # rescales row a to the current epoch
    faded = 0.5 ** (1 + 2 * FADE_SPAN + 0.25)
    assert row("a") == {"b": pytest.approx(faded, rel=1e-4), "c": pytest.approx(1.0)}
    filler(4)
    learner.learn([s(("a",), "d")], meta)  # full: d replaces b, now the least counted
    assert row("a") == {"c": pytest.approx(0.5**1.25), "d": pytest.approx(1.0)}


def test_transition_memory_learns_a_chain():
    learner = OnlineLearner(MC, TrainerConfig(batch_size=32, transition_negatives=2), CPU)
    run(learner, StateStore(), chain(3000))
    ranks = learner.rank_targets(chain(3300)[3000:])
    assert sum(r <= 3 for r in ranks) / len(ranks) > 0.9, ranks


def test_restore_from_state_is_exact():
    cfg = TrainerConfig(batch_size=32, transition_negatives=2)
    data = topic_samples(1200)
    a, store_a = OnlineLearner(MC_FADING, cfg, CPU), StateStore()
    run(a, store_a, data[:600])
    store_b = StateStore()
    store_b.rows, store_b.items = dict(store_a.rows), dict(store_a.items)
    store_b.dense, store_b.meta = store_a.dense, copy.deepcopy(store_a.meta)
    b = OnlineLearner(MC_FADING, cfg, CPU)
    run(a, store_a, data[600:])
    run(b, store_b, data[600:])
    assert store_a.rows == store_b.rows and store_a.items == store_b.items
    assert store_a.meta == store_b.meta and store_a.dense == store_b.dense


def test_onnx_matches_learner_scores(tmp_path):
    learner = OnlineLearner(MC_FADING, TrainerConfig(batch_size=64), CPU)
    meta = new_meta("m")
    data = topic_samples(2000) + chain(600, length=20)
    for i in range(0, len(data), 64):
        learner.learn(data[i : i + 64], meta)
    assert learner.model.transition_weight is not None
    rec = OnnxRecommender(publish(tmp_path, build_version(learner, meta, 20, {})) / "model.onnx")
    # The last history is longer than the H the model reads: its older items are excluded
    # through exclude_ids, in the learner's ranking and in the graph alike.
    long = [f"t{n % 4}_{n % 10}" for n in range(30)] + ["c3"]
    histories = [["c1", "c2", "c3"], ["t2_5"], ["t1_1", "c4"], ["c5"] * 3, [], long]
    ids, mask = rec.encode(histories)
    o_ids, o_scores = rec.raw(ids, mask, rec.encode_excluded(histories))
    samples = [Sample("m", "u", tuple(h), "c0", 1, 1.0, 0, "e") for h in histories]
    scores = learner.score_histories(samples)
    older = [learner.catalog.index[i] for i in long[: -MC_FADING.history_length]]
    assert torch.isinf(scores[-1, older]).all()  # known, though not read by the towers
    t_scores, t_idx = torch.topk(scores, 20, dim=1)
    np.testing.assert_allclose(o_scores, t_scores.numpy(), atol=1e-4, rtol=0)
    for o_row, t_row, s_row in zip(o_ids, t_idx.numpy(), t_scores.numpy(), strict=True):
        if np.all(np.diff(s_row) < -1e-4):
            assert [rec.item_ids[i - 1] for i in o_row] == [learner.catalog.ids[i] for i in t_row]


def _count_reference(block: np.ndarray, counts: list[tuple[int, int, float]]) -> None:
    """One step's counts, row by row in plain Python (the memory's definition): sums per
    (row, neighbour); held neighbours add theirs; then the strongest M of old and new."""
    m = block.shape[1] // 2
    sums: dict[tuple[int, int], float] = {}
    for r, j, w in counts:
        sums[r, j] = sums.get((r, j), 0.0) + float(np.float32(w))
    for r in sorted({r for r, _ in sums}):
        idx, cnt = block[r, :m], block[r, m:]
        new = []
        for (rr, j), total in sorted(sums.items()):
            if rr != r:
                continue
            held = [k for k in range(m) if idx[k] == j]
            if held:
                cnt[held[0]] = np.float32(float(cnt[held[0]]) + total)
            else:
                new.append((-np.float32(total), j))
        slots = sorted(range(m), key=lambda k: (-np.inf if idx[k] == 0 else cnt[k], k))
        for (neg, j), k in zip(sorted(new), slots, strict=False):
            strength = -np.inf if idx[k] == 0 else cnt[k]
            if -neg > strength:
                idx[k], cnt[k] = j, -neg


def test_batched_counting_matches_the_definition_bit_for_bit_in_any_order():
    rng = np.random.default_rng(7)
    for m in (1, 3, 8):
        fast = np.zeros((3, 2 * m), np.float32)
        slow = fast.copy()
        # Steps with few distinct neighbours (hits, repeated sums) and with many
        # (evictions, ties), the counts of three rows interleaved.
        for step in range(40):
            counts = [
                (
                    int(rng.integers(0, 3)),
                    int(rng.integers(1, 4 if step % 2 else 40)),
                    1.0 / int(rng.integers(1, 4)),
                )
                for _ in range(30)
            ]
            rows, nbrs, weights = (np.array(c) for c in zip(*counts, strict=True))
            shuffled = fast.copy()
            perm = rng.permutation(len(counts))
            _count_all(fast, rows, nbrs, weights)
            _count_all(shuffled, rows[perm], nbrs[perm], weights[perm])
            _count_reference(slow, counts)
            assert fast.tobytes() == slow.tobytes(), (m, step)
            assert shuffled.tobytes() == fast.tobytes(), (m, step)


def test_a_step_counts_every_pair_of_its_positives():
    """The counts of a step, built from the batch's index arrays, equal counting each
    positive's pairs (nearest history item weighted most, "h -> t" and "t -> h"): skipped
    are history items equal to the target and padding; duplicates in a history count
    twice."""
    mc = ModelConfig(  # stored counts are true counts without forgetting
        dim=8,
        history_length=4,
        hidden=8,
        transition_slots=3,
        transition_pairs=3,
        transition_decay=0.5,
        transition_half_life=0,
    )
    learner = OnlineLearner(mc, TrainerConfig(num_negatives=2), CPU)
    meta = new_meta("m")
    s = lambda h, t, i: Sample("m", "u", h, t, 1, 1.0, i, f"e{i}")  # noqa: E731
    learner.learn([s((), x, i) for i, x in enumerate("abcdefg")], meta)  # id rows for all
    batch = [
        s(("a", "b", "c"), "d", 10),
        s(("e", "d", "d"), "a", 11),  # a duplicate, nearest first
        s(("b",), "b", 12),  # the target itself: nothing counted
        s(("f", "g", "a", "c"), "e", 13),  # longer than transition_pairs
        s(("c", "b"), "a", 14),
    ]
    cat, m, off = learner.catalog, learner.trans_m, learner.trans_off
    before = learner.table.data[:, off : off + 2 * m].clone().numpy()
    expected: dict[int, list[tuple[int, float]]] = {}
    for x in batch:
        t = cat.index[x.target]
        for d, item in enumerate(reversed(x.history[-3:])):
            h = cat.index[item]
            if h != t:
                expected.setdefault(int(cat.row_of[h]), []).append((t, 0.5**d))
                expected.setdefault(int(cat.row_of[t]), []).append((h, 0.5**d))
    learner.learn(batch, meta)
    after = learner.table.data[:, off : off + 2 * m].numpy()
    for row, counts in expected.items():
        want = before[row : row + 1].copy()
        nbrs, weights = (np.array(c) for c in zip(*counts, strict=True))
        _count_all(want, np.zeros(len(counts), np.int64), nbrs, weights)
        np.testing.assert_array_equal(after[row], want[0])
    untouched = [r for r in range(1, len(before)) if r not in expected]
    np.testing.assert_array_equal(after[untouched], before[untouched])
