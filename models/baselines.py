"""Non-neural baselines for prequential (test-then-train) evaluation.

Every baseline follows the same protocol as :class:`models.trainer.OnlineLearner`:

- ``ingest_items(items)``: catalogue items become known (score 0 until learned about);
- ``rank_targets(samples)``: the 1-based rank of each sample's target among all known
  items, excluding the sample's known items (``Sample.events``: every event's item, any
  label, as the learner excludes). Call it *before* ``learn``;
- ``learn(samples)``: update from the positives (``label == 1`` and ``weight > 0``).

Rank semantics (shared by all baselines, see :meth:`Baseline.rank_targets`):

- rank = 1 + (known items scoring strictly higher) + (other known items scoring *equal*):
  ties are counted against the target, so a baseline with many equal scores (counts of 0)
  never gets credit for an arbitrary tie-break. The neural learner's float scores
  practically never tie, so both conventions agree for it;
- a target the baseline has never seen, or one of the sample's known items (they are
  excluded from the candidates), gets ``len(known) + 1`` (a miss), as in the learner.

The baselines score from the positives' ``Sample.history`` only, as they are defined.

Baselines:

- :class:`Popularity`: all-time positive counts;
- :class:`RecentPopularity`: counts over a sliding window of the last N positives;
- :class:`ISGD`: incremental matrix factorisation (Vinagre et al., 2014);
- :class:`CoOccurrence`: "last items -> next item" transition counts ("co-occurrence
  (last item)");
- :class:`WindowedCoOccurrence`: symmetric co-occurrence over a window of each user's
  recent positives, decayed by distance, scored against the user's decayed recent history;
- :class:`SessionKNN`: session-based nearest neighbours (V-SKNN: sessions split at a gap,
  the current session's recent items weighted by recency, cosine similarity).

``rtrec eval`` reports the online learner against the strongest of them.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

from models.events import Item
from models.history import Sample
from models.item_table import stable_seed

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


def positives(samples: Iterable[Sample]) -> list[Sample]:
    """The samples a model learns from as positives."""
    return [s for s in samples if s.label == 1 and s.weight > 0]


class Baseline:
    """Item index (item id <-> dense index) and the shared ranking logic.

    Subclasses implement :meth:`_scores` (``[B, n]`` scores of every known item) and
    :meth:`_learn_one`; they may override :meth:`_grow` to size per-item arrays.
    """

    name = "baseline"

    def __init__(self) -> None:
        self.index: dict[str, int] = {}
        self.ids: list[str] = []
        self._capacity = 0
        # Counting baselines: positives per item, and the scale that keeps popularity below
        # any difference of their own scores (see _tie_breaks).
        self.counts: FloatArray = np.zeros(0)
        self._tie_scale = 0.0

    def __len__(self) -> int:
        return len(self.ids)

    # ------------------------------------------------------------------ item index
    def _ensure(self, item_id: str) -> int:
        idx = self.index.get(item_id)
        if idx is None:
            idx = len(self.ids)
            if idx >= self._capacity:
                self._capacity = max(1024, 2 * self._capacity)
                self._grow(self._capacity)
            self.index[item_id] = idx
            self.ids.append(item_id)
            self._new_item(idx, item_id)
        return idx

    def _grow(self, capacity: int) -> None:
        """Resize per-item arrays to ``capacity`` rows (new rows zero)."""

    def _new_item(self, idx: int, item_id: str) -> None:
        """Initialise the state of a newly known item."""

    @staticmethod
    def _resize(a: FloatArray, capacity: int) -> FloatArray:
        out = np.zeros((capacity, *a.shape[1:]), dtype=a.dtype)
        out[: a.shape[0]] = a
        return out

    def _tie_breaks(self, rows: int) -> FloatArray:
        """``[rows, n]`` popularity scores scaled below ``self._tie_scale``, the start of a
        counting baseline's scores: popularity then only breaks ties. Needs ``counts``."""
        pop = self.counts[: len(self.ids)]
        top = float(pop.max()) if len(pop) else 0.0
        out: FloatArray = np.tile(pop * (self._tie_scale / (top + 1.0)), (rows, 1))
        return out

    def ingest_items(self, items: Iterable[Item]) -> None:
        for it in items:
            self._ensure(it.item_id)

    # ------------------------------------------------------------------ learning
    def learn(self, samples: list[Sample]) -> None:
        for s in positives(samples):
            for h in s.history:
                self._ensure(h)
            self._learn_one(s, self._ensure(s.target))

    def _learn_one(self, s: Sample, target: int) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ ranking
    def _scores(self, samples: list[Sample]) -> FloatArray:
        """Scores ``[B, n]`` of every known item for each sample (a fresh, writable array)."""
        raise NotImplementedError

    def _masked_scores(self, samples: list[Sample]) -> FloatArray:
        scores = self._scores(samples)
        for row, s in enumerate(samples):
            hist = [self.index[h] for h in s.events if h in self.index]
            if hist:
                scores[row, hist] = -np.inf
        return scores

    def rank_targets(self, samples: list[Sample]) -> list[int]:
        """1-based rank of each target among known items not known to the user (ties count
        against it). Unknown targets and the user's known items get ``len(self) + 1``.
        """
        miss = len(self.ids) + 1
        out = [miss] * len(samples)
        rows = [i for i, s in enumerate(samples) if s.target in self.index]
        if not rows:
            return out
        sub = [samples[i] for i in rows]
        scores = self._masked_scores(sub)
        tgt = np.array([self.index[s.target] for s in sub], dtype=np.int64)
        t = scores[np.arange(len(sub)), tgt][:, None]
        # >= counts the target itself once: 1 + greater + (equal - 1).
        ranks = (scores >= t).sum(axis=1)
        for i, tv, r in zip(rows, t[:, 0].tolist(), ranks.tolist(), strict=True):
            out[i] = int(r) if np.isfinite(tv) else miss
        return out

    def top_k(self, samples: list[Sample], k: int) -> list[list[str]]:
        """The ``k`` best items not known to the user per sample, best first (ties in index
        order)."""
        n = len(self.ids)
        if not samples or n == 0:
            return [[] for _ in samples]
        scores = self._masked_scores(samples)
        kk = min(k, n)
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        out: list[list[str]] = []
        for row in range(len(samples)):
            cand = part[row]
            vals = scores[row, cand]
            order = cand[np.lexsort((cand, -vals))]
            out.append([self.ids[int(j)] for j in order if np.isfinite(scores[row, j])])
        return out


class Popularity(Baseline):
    """Most popular items of all time (count of positives)."""

    name = "popularity"

    def __init__(self) -> None:
        super().__init__()
        self.counts: FloatArray = np.zeros(0)

    def _grow(self, capacity: int) -> None:
        self.counts = self._resize(self.counts, capacity)

    def _learn_one(self, s: Sample, target: int) -> None:
        self.counts[target] += 1.0

    def _scores(self, samples: list[Sample]) -> FloatArray:
        n = len(self.ids)
        return np.tile(self.counts[:n], (len(samples), 1))


class RecentPopularity(Popularity):
    """Most popular items over the last ``window_events`` positives (a sliding window)."""

    name = "recent_popularity"

    def __init__(self, window_events: int = 5000) -> None:
        super().__init__()
        if window_events <= 0:
            raise ValueError(f"window_events must be > 0, got {window_events}")
        self.window_events = window_events
        self.window: deque[int] = deque()

    def _learn_one(self, s: Sample, target: int) -> None:
        self.counts[target] += 1.0
        self.window.append(target)
        if len(self.window) > self.window_events:
            self.counts[self.window.popleft()] -= 1.0


class ISGD(Baseline):
    """Incremental SGD matrix factorisation for positive-only feedback (Vinagre et al. 2014).

    For each positive (u, i): err = 1 - u.i; u += lr (err i - reg u); i += lr (err u - reg i)
    (both with the old values). New users and items start from small random vectors
    seeded from their ids, so runs are reproducible. Score of item j for user u = u.j.
    """

    name = "isgd"

    def __init__(
        self,
        k: int = 32,
        lr: float = 0.05,
        reg: float = 0.01,
        init_std: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.k, self.lr, self.reg, self.init_std, self.seed = k, lr, reg, init_std, seed
        self.items: FloatArray = np.zeros((0, k))
        self.users: dict[str, FloatArray] = {}

    def _random_vector(self, kind: str, key: str) -> FloatArray:
        rng = np.random.default_rng(stable_seed(self.seed, kind, key))
        return rng.normal(0.0, self.init_std, self.k)

    def _grow(self, capacity: int) -> None:
        self.items = self._resize(self.items, capacity)

    def _new_item(self, idx: int, item_id: str) -> None:
        self.items[idx] = self._random_vector("item", item_id)

    def user_vector(self, user_id: str, create: bool = False) -> FloatArray:
        u = self.users.get(user_id)
        if u is None:
            u = self._random_vector("user", user_id)
            if create:
                self.users[user_id] = u
        return u

    def _learn_one(self, s: Sample, target: int) -> None:
        u = self.user_vector(s.user_id, create=True)
        i = self.items[target].copy()
        err = 1.0 - float(u @ i)
        self.items[target] = i + self.lr * (err * u - self.reg * i)
        self.users[s.user_id] = u + self.lr * (err * i - self.reg * u)

    def _scores(self, samples: list[Sample]) -> FloatArray:
        n = len(self.ids)
        users = np.stack([self.user_vector(s.user_id) for s in samples])
        out: FloatArray = users @ self.items[:n].T
        return out


class CoOccurrence(Baseline):
    """ "Last items -> next item": counts of (previous item -> next item) transitions.

    Learning a positive with target j counts ``h -> j`` for the ``pair_window`` items h
    right before j in the user's history (1 = the immediately preceding item only).
    Score of candidate j = sum over the user's last ``last_n`` history items h (newest
    first, position p = 0, 1, ...) of ``count(h -> j) / (p + 1)``, plus a popularity
    term smaller than any difference of co-occurrence scores (it only breaks ties).
    """

    name = "cooccurrence_last_item"

    def __init__(self, last_n: int = 5, pair_window: int = 1) -> None:
        super().__init__()
        if last_n <= 0 or pair_window <= 0:
            raise ValueError("last_n and pair_window must be > 0")
        self.last_n = last_n
        self.pair_window = pair_window
        self.next_counts: dict[int, dict[int, float]] = {}
        self.counts: FloatArray = np.zeros(0)
        # Co-occurrence scores are multiples of 1 / lcm(1..last_n): keep the popularity term
        # below half of that step so it never overturns a co-occurrence order.
        self._tie_scale = 0.5 / math.lcm(*range(1, last_n + 1))

    def _grow(self, capacity: int) -> None:
        self.counts = self._resize(self.counts, capacity)

    def _learn_one(self, s: Sample, target: int) -> None:
        self.counts[target] += 1.0
        for h in s.history[-self.pair_window :]:
            row = self.next_counts.setdefault(self.index[h], {})
            row[target] = row.get(target, 0.0) + 1.0

    def _scores(self, samples: list[Sample]) -> FloatArray:
        out = self._tie_breaks(len(samples))
        for row, s in enumerate(samples):
            for p, h in enumerate(reversed(s.history[-self.last_n :])):
                nxt = self.next_counts.get(self.index.get(h, -1))
                if not nxt:
                    continue
                idx = np.fromiter(nxt.keys(), dtype=np.int64, count=len(nxt))
                cnt = np.fromiter(nxt.values(), dtype=np.float64, count=len(nxt))
                out[row, idx] += cnt / (p + 1)
        return out


def _sparse_add(out: FloatArray, row: dict[int, float] | None, scale: float) -> None:
    """``out[j] += scale * row[j]`` for every entry of a sparse count row."""
    if not row:
        return
    idx = np.fromiter(row.keys(), dtype=np.int64, count=len(row))
    val = np.fromiter(row.values(), dtype=np.float64, count=len(row))
    out[idx] += scale * val


class WindowedCoOccurrence(Baseline):
    """Symmetric, windowed, decayed co-occurrence of a user's positives.

    When a user's new positive j arrives and the user's previous ``window`` positives are
    h_1 (newest) ... h_W, ``decay ** (d - 1)`` is added to C[h_d, j] and to C[j, h_d].
    The score of a candidate c is ``sum_a decay ** a * C[h_(a+1), c]`` over the same
    window of the sample's history; popularity only breaks ties. C is stored as sparse
    rows (a catalogue of n items would need n^2 dense cells).
    """

    name = "cooccurrence_windowed"

    def __init__(self, window: int = 10, decay: float = 0.7) -> None:
        super().__init__()
        if window <= 0 or not 0.0 < decay <= 1.0:
            raise ValueError(f"window must be > 0 and decay in (0, 1], got {window}, {decay}")
        self.window = window
        self.decay = decay
        self.rows: dict[int, dict[int, float]] = {}
        self.counts: FloatArray = np.zeros(0)
        # The smallest non-zero score is decay^(2(W-1)) (one pair at the far end of both
        # windows); the popularity term stays far below it so it only breaks ties.
        self._tie_scale = 1e-6 * decay ** (2 * (window - 1))

    def _grow(self, capacity: int) -> None:
        self.counts = self._resize(self.counts, capacity)

    def _learn_one(self, s: Sample, target: int) -> None:
        self.counts[target] += 1.0
        recent = s.history[-self.window :]
        for d, h in enumerate(reversed(recent), start=1):
            hi = self.index[h]
            if hi == target:
                continue
            w = self.decay ** (d - 1)
            fwd = self.rows.setdefault(hi, {})
            fwd[target] = fwd.get(target, 0.0) + w
            back = self.rows.setdefault(target, {})
            back[hi] = back.get(hi, 0.0) + w

    def _scores(self, samples: list[Sample]) -> FloatArray:
        out = self._tie_breaks(len(samples))
        for row, s in enumerate(samples):
            for a, h in enumerate(reversed(s.history[-self.window :])):
                _sparse_add(out[row], self.rows.get(self.index.get(h, -1)), self.decay**a)
        return out


class SessionKNN(Baseline):
    """V-SKNN style session-based nearest neighbours.

    Each user's positives are cut into sessions at gaps longer than ``gap_ms``. To score
    a sample, the user's latest session's last ``recent`` items form the query, weighted
    linearly by recency (newest 1, then (recent - 1) / recent, ...). Every other session
    seen so far (of any user, still open or not) that shares an item with the query is a
    candidate; its similarity is the weighted overlap over sqrt(|query| * |session|) (the
    cosine of binary session vectors, with the query's weights), and the ``neighbours``
    most similar vote for their items with their similarity. Popularity only breaks ties.

    ``sample_per_item`` bounds the candidates: only the most recent sessions holding each
    query item are looked at, as V-SKNN samples recent sessions.
    """

    name = "session_knn"

    def __init__(
        self,
        gap_ms: int = 30 * 60 * 1000,
        recent: int = 10,
        neighbours: int = 100,
        sample_per_item: int = 500,
    ) -> None:
        super().__init__()
        if gap_ms <= 0 or recent <= 0 or neighbours <= 0 or sample_per_item <= 0:
            raise ValueError("gap_ms, recent, neighbours and sample_per_item must be > 0")
        self.gap_ms = gap_ms
        self.recent = recent
        self.neighbours = neighbours
        self.sample_per_item = sample_per_item
        self.sessions: list[list[int]] = []  # session id -> its unique items, in order
        self.by_item: dict[int, deque[int]] = {}  # item -> ids of recent sessions holding it
        self.current: dict[str, tuple[int, int]] = {}  # user -> (session id, last ts)
        self.counts: FloatArray = np.zeros(0)
        self._tie_scale = 1e-9

    def _grow(self, capacity: int) -> None:
        self.counts = self._resize(self.counts, capacity)

    def _learn_one(self, s: Sample, target: int) -> None:
        self.counts[target] += 1.0
        sid, last = self.current.get(s.user_id, (-1, s.ts))
        if sid < 0 or s.ts - last > self.gap_ms:
            sid = len(self.sessions)
            self.sessions.append([])
        session = self.sessions[sid]
        if target not in session:
            session.append(target)
            self.by_item.setdefault(target, deque(maxlen=self.sample_per_item)).append(sid)
        self.current[s.user_id] = (sid, max(last, s.ts))

    def _query(self, s: Sample) -> tuple[int, dict[int, float]]:
        """(the user's latest session id or -1, {item: recency weight})."""
        sid = self.current.get(s.user_id, (-1, 0))[0]
        items = self.sessions[sid][-self.recent :] if sid >= 0 else []
        n = len(items)
        return sid, {i: (self.recent - (n - 1 - pos)) / self.recent for pos, i in enumerate(items)}

    def _scores(self, samples: list[Sample]) -> FloatArray:
        out = self._tie_breaks(len(samples))
        for row, s in enumerate(samples):
            own, q = self._query(s)
            overlap: dict[int, float] = {}
            for i, w in q.items():
                for sid in self.by_item.get(i, ()):
                    if sid != own:
                        overlap[sid] = overlap.get(sid, 0.0) + w
            if not overlap:
                continue
            sids = np.fromiter(overlap.keys(), dtype=np.int64, count=len(overlap))
            ov = np.fromiter(overlap.values(), dtype=np.float64, count=len(overlap))
            sizes = np.array([len(self.sessions[j]) for j in sids.tolist()], dtype=np.float64)
            sim = ov / np.sqrt(len(q) * sizes)
            if len(sids) > self.neighbours:
                keep = np.argpartition(-sim, self.neighbours - 1)[: self.neighbours]
                sids, sim = sids[keep], sim[keep]
            for sid, w in zip(sids.tolist(), sim.tolist(), strict=True):
                out[row, self.sessions[sid]] += w
        return out


def default_baselines() -> list[Baseline]:
    """The baselines `rtrec eval` compares the online learner with."""
    return [
        Popularity(),
        RecentPopularity(),
        ISGD(),
        CoOccurrence(),
        WindowedCoOccurrence(),
        SessionKNN(),
    ]
