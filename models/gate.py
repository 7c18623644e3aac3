"""The publication gate and automatic rollback: which exported versions reach serving.

Every exported version is written to the registry, but only a *published* one moves
``LATEST`` and is announced as such on the ``models`` topic. A candidate is published when

1. its ONNX graph loads in onnxruntime and answers a probe batch with finite scores and
   in-range item indices, and
2. there is no serving version yet, or, over at least ``trainer.gate_min_events``
   positives scored since the serving version was published, the training run's
   prequential Recall@K on them is at least ``(1 - trainer.gate_tolerance)`` times the
   serving version's Recall@K on the same positives (K = ``trainer.metrics_k``), and
   it is above the floor ``trainer.gate_floor`` x the serving version's value at
   publication unless it is clearly above the serving version's (:func:`clear_margin`).

The floor is there because the events may be poisoned too: during a label-flip burst
every model scores about as badly on the flipped events, so the comparison alone would
pass a model that learned the flips. A genuine shift lowers the serving version's figure
as well, and a candidate that has learned it beats it and passes.

Otherwise it is *held*: its manifest's ``publication`` section says why, with the figures,
and it never moves ``LATEST``. The training run's figure stands for the candidate: each
positive was ranked by the model of that moment before it learned from it, so it is the
honest out-of-sample figure of the models between the serving version and the candidate.

The serving version keeps being scored on every step. When its moving-average Recall@K
falls below ``trainer.rollback_share`` of its value at publication (:class:`Reference`)
for ``trainer.rollback_steps`` consecutive steps,
and the previously published version scores better on the same steps, the gate rolls
back: the previous version serves again and a revocation record is emitted. The trainer
keeps training: new candidates are compared against the version now serving, so a model
that stays worse stays held, while one that recovers (or learns a genuine shift) gets
published again. Restoring the old training state instead would discard what was learned
from every clean event since, and pausing would stop freshness for all users.

The serving and previous versions' graphs are in Flink state (``StepResult.gate_blob``),
so a restored trainer makes the same decisions as an uninterrupted one.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from models.config import TrainerConfig
from models.drift import moving_average
from models.history import Sample
from models.serving import OnnxRecommender, probe
from models.version import ModelVersion

GATE_FORMAT = 1
POSITIVES_PER_STEP = 64  # the most positives of one step the gate ranks (observe)
PUBLISHED, HELD = "published", "held"


@dataclass
class Reference:
    """A published version the gate scores. ``baseline``: its Recall@K at publication,
    the figure the gate passed it on; for a version published without one (the first,
    or after a rollback) its Recall@K over its first ``gate_min_events`` positives
    (None until then)."""

    version: int
    name: str
    baseline: float | None = None


@dataclass
class GateState:
    """The gate's part of the trainer's meta state (plain values: pickles, JSON-dumps).

    ``n`` positives were scored since ``serving`` was published; the training run hit
    ``live_hits`` of them in its top K, the serving version ``serving_hits``. The moving
    averages are per step; ``low_steps`` counts consecutive steps below the rollback bar
    (``previous_ema``: the previous version's Recall@K over them).
    """

    format: int = GATE_FORMAT
    serving: Reference | None = None
    previous: Reference | None = None
    n: int = 0
    live_hits: int = 0
    serving_hits: int = 0
    serving_ema: float | None = None
    previous_ema: float | None = None
    low_steps: int = 0
    # Positives of the consecutive low steps, and the two versions' hits on them.
    low_n: int = 0
    low_serving_hits: int = 0
    low_previous_hits: int = 0
    published: int = 0
    held: int = 0
    rollbacks: int = 0

    @classmethod
    def of(cls, meta: dict[str, Any]) -> GateState:
        """The state kept in ``meta["publication"]`` (a fresh one when absent)."""
        raw = meta.get("publication")
        if raw is None:
            return cls()
        if raw.get("format") != GATE_FORMAT:
            raise ValueError(
                f"publication gate state has format {raw.get('format')}, this release reads "
                f"{GATE_FORMAT}; restore from a compatible savepoint"
            )
        refs = {k: Reference(**raw[k]) if raw[k] else None for k in ("serving", "previous")}
        return cls(**{**raw, **refs})

    def save(self, meta: dict[str, Any]) -> None:
        meta["publication"] = asdict(self)

    def counters(self) -> dict[str, Any]:
        """For manifests and metrics records."""
        return {
            "serving": self.serving.name if self.serving else None,
            "published": self.published,
            "held": self.held,
            "rollbacks": self.rollbacks,
        }


@dataclass
class Revocation:
    """An automatic rollback: ``revoked`` no longer serves, ``rollback_to`` does."""

    model_key: str
    revoked: str
    revoked_version: int
    rollback_to: str
    reason: str
    step: int
    event_time_hwm_ms: int
    figures: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The JSON document of the revocation (the version stream's manifest field)."""
        return {"kind": "revocation", **asdict(self)}


def hits(
    rec: OnnxRecommender, samples: list[Sample], k: int, seen: Callable[[Sample], tuple[str, ...]]
) -> list[bool]:
    """Whether each sample's target is in ``rec``'s top ``k`` for the history the trainer
    reads (``seen``), leaving out every item the user is known to have (``Sample.events``),
    as the trainer's own ranking does."""
    if not samples:
        return []
    top = rec.recommend([list(seen(s)) for s in samples], k, [list(s.events) for s in samples])
    return [s.target in {item for item, _ in row} for s, row in zip(samples, top, strict=True)]


def clear_margin(ref: float, n: int, tolerance: float) -> float:
    """How far above the serving version's Recall@K ``ref`` (over ``n`` positives) a
    candidate must be to beat it clearly: by the tolerance, and by two standard errors
    of ``ref``, so that a few lucky hits on a small sample do not count."""
    return max(ref * tolerance, 2.0 * math.sqrt(ref * (1.0 - ref) / max(n, 1)))


class PublicationGate:
    """The gate of one model key: decisions and scoring, with the serving and previous
    versions loaded in onnxruntime (CPU, one thread: the trainer owns its core)."""

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        self.serving: OnnxRecommender | None = None
        self.previous: OnnxRecommender | None = None
        self._bytes: tuple[bytes | None, bytes | None] = (None, None)
        self._loaded: tuple[str | None, str | None] = (None, None)

    @staticmethod
    def _load(onnx: bytes | None) -> OnnxRecommender | None:
        return OnnxRecommender(onnx, gpu=False, threads=1, manifest={}) if onnx else None

    def ensure_loaded(self, meta: dict[str, Any], blob: Callable[[], bytes | None]) -> None:
        """Load the serving and previous graphs from ``blob()`` (the trainer's gate state)
        when this process has not got the ones ``meta`` names (a restore or a new key)."""
        st = GateState.of(meta)
        want = (
            st.serving.name if st.serving else None,
            st.previous.name if st.previous else None,
        )
        if want == self._loaded:
            return
        raw = blob()
        if raw is None:
            raise ValueError(
                f"model {meta['model_key']}: the gate state names serving version {want[0]} "
                "but its graph is missing from the trainer state; restore from a complete "
                "checkpoint or savepoint"
            )
        serving, previous = pickle.loads(raw)
        self._bytes = (serving, previous)
        self.serving, self.previous = self._load(serving), self._load(previous)
        self._loaded = want

    def _blob(self) -> bytes:
        return pickle.dumps(self._bytes, protocol=pickle.HIGHEST_PROTOCOL)

    def observe(
        self,
        meta: dict[str, Any],
        samples: list[Sample],
        ranks: list[int],
        seen: Callable[[Sample], tuple[str, ...]],
    ) -> tuple[Revocation | None, bytes | None]:
        """Score one step's ranked positives (``ranks``: the training run's, in order)
        with the serving and previous versions; returns the revocation of an automatic
        rollback and the new gate blob to store (both None when nothing rolled back)."""
        st = GateState.of(meta)
        if st.serving is None or self.serving is None or not samples:
            return None, None
        # A step is scored on its first POSITIVES_PER_STEP positives: a fair sample of the
        # stream (a decision still sees thousands, gate_min_events at least), and the
        # gate's cost per learned sample falls in large (catch-up) steps.
        samples, ranks = samples[:POSITIVES_PER_STEP], ranks[:POSITIVES_PER_STEP]
        k = self.cfg.metrics_k
        got = hits(self.serving, samples, k, seen)
        st.n += len(samples)
        st.live_hits += sum(r <= k for r in ranks)
        st.serving_hits += sum(got)
        if st.serving.baseline is None and st.n >= self.cfg.gate_min_events:
            st.serving.baseline = st.serving_hits / st.n
        st.serving_ema = moving_average(st.serving_ema, sum(got) / len(got))
        base = st.serving.baseline
        below = (
            self.cfg.rollback_share > 0
            and base is not None
            and st.serving_ema < self.cfg.rollback_share * base
        )
        # The previous version is scored only while the serving one is below the bar (a
        # rollback needs both; scoring it always would double the gate's cost), and the
        # two are compared on the positives of those steps.
        if below and self.previous is not None:
            st.low_n += len(samples)
            st.low_serving_hits += sum(got)
            st.low_previous_hits += sum(hits(self.previous, samples, k, seen))
            st.previous_ema = st.low_previous_hits / st.low_n
        else:
            st.low_n = st.low_serving_hits = st.low_previous_hits = 0
            st.previous_ema = None
        low = below and st.previous is not None and st.low_previous_hits > st.low_serving_hits
        st.low_steps = st.low_steps + 1 if low else 0
        revocation = None
        if st.low_steps >= max(1, self.cfg.rollback_steps) and st.previous is not None:
            revocation = self._roll_back(meta, st)
        st.save(meta)
        return revocation, (self._blob() if revocation else None)

    def _roll_back(self, meta: dict[str, Any], st: GateState) -> Revocation:
        assert st.serving is not None and st.previous is not None
        figures = {
            "serving_recall_ema": st.serving_ema,
            "serving_baseline": st.serving.baseline,
            "previous_recall_ema": st.previous_ema,
            "rollback_share": self.cfg.rollback_share,
            "steps_below": st.low_steps,
        }
        rev = Revocation(
            model_key=meta["model_key"],
            revoked=st.serving.name,
            revoked_version=st.serving.version,
            rollback_to=st.previous.name,
            reason=(
                f"recent Recall@{self.cfg.metrics_k} of {st.serving.name} stayed below "
                f"{self.cfg.rollback_share:g} x its value at publication "
                f"({st.serving_ema:.4f} < {self.cfg.rollback_share:g} x {st.serving.baseline:.4f}) "
                f"for {st.low_steps} steps, while {st.previous.name} scored "
                f"{st.previous_ema:.4f} on the same steps"
            ),
            step=meta["step"],
            event_time_hwm_ms=meta["hwm_ts"],
            figures=figures,
        )
        st.serving, st.previous = Reference(st.previous.version, st.previous.name), None
        st.serving_ema, st.previous_ema = st.previous_ema, None
        st.n = st.live_hits = st.serving_hits = st.low_steps = 0
        st.low_n = st.low_serving_hits = st.low_previous_hits = 0
        st.rollbacks += 1
        self.serving, self.previous = self.previous, None
        self._bytes = (self._bytes[1], None)
        self._loaded = (st.serving.name, None)
        return rev

    def decide(self, meta: dict[str, Any], version: ModelVersion) -> bytes | None:
        """Decide ``version``'s status, recorded in its manifest's ``publication`` section
        and the gate state; returns the new gate blob to store when it was published."""
        cfg, st = self.cfg, GateState.of(meta)
        serving = st.serving.name if st.serving else None
        doc: dict[str, Any] = {
            "gate": cfg.publish_gate,
            "serving_before": serving,
            "events": st.n,
            "min_events": cfg.gate_min_events,
            "tolerance": cfg.gate_tolerance,
            "k": cfg.metrics_k,
        }
        live = st.live_hits / st.n if st.n else None
        ref = st.serving_hits / st.n if st.n else None
        base = st.serving.baseline if st.serving else None
        floor = cfg.gate_floor * base if base is not None and cfg.gate_floor > 0 else None
        doc.update(candidate_recall=live, serving_recall=ref)
        if not cfg.publish_gate:
            st.published += 1
            st.save(meta)
            version.manifest["publication"] = {
                **doc,
                "status": PUBLISHED,
                "reason": "gate off",
                **st.counters(),
            }
            return None
        cand: OnnxRecommender | None = None
        reason = ""
        try:
            cand = self._load(version.onnx_bytes)
            assert cand is not None
            probe(cand)
        except Exception as e:  # any load or probe failure holds the version
            reason = f"load or probe failed: {type(e).__name__}: {e}"
        if reason:
            status = HELD
        elif st.serving is None:
            status, reason = PUBLISHED, "first version"
        elif st.n < cfg.gate_min_events:
            status = HELD
            reason = (
                f"only {st.n} positives scored since {serving} was published; the gate "
                f"compares over at least trainer.gate_min_events = {cfg.gate_min_events}"
            )
        elif live is not None and ref is not None and live < ref * (1.0 - cfg.gate_tolerance):
            status = HELD
            reason = (
                f"Recall@{cfg.metrics_k} {live:.4f} of the training run on {st.n} positives "
                f"is below (1 - {cfg.gate_tolerance:g}) x {ref:.4f} of {serving} on the same"
            )
        elif (
            live is not None
            and ref is not None
            and floor is not None
            and live < floor
            and live < ref + clear_margin(ref, st.n, cfg.gate_tolerance)
        ):
            # The events themselves may be poisoned (a label-flip burst makes every model
            # look alike on them): a candidate that collapsed far below what the serving
            # version scored at publication passes only if it clearly beats the serving
            # version on the same events (a real shift it has learned).
            status = HELD
            reason = (
                f"Recall@{cfg.metrics_k} {live:.4f} of the training run is below the floor "
                f"{floor:.4f} (trainer.gate_floor {cfg.gate_floor:g} x {serving}'s value at "
                f"publication) and not clearly above {ref:.4f} of {serving} on the same events"
            )
        else:
            status = PUBLISHED
            reason = f"Recall@{cfg.metrics_k} {live:.4f} against {ref:.4f} of {serving}"
        doc.update(status=status, reason=reason)
        blob = None
        if status == PUBLISHED:
            st.previous = st.serving
            st.serving = Reference(version.version, version.name, live)
            st.n = st.live_hits = st.serving_hits = st.low_steps = 0
            st.low_n = st.low_serving_hits = st.low_previous_hits = 0
            st.previous_ema, st.serving_ema = None, None
            st.published += 1
            self.previous, self.serving = self.serving, cand
            self._bytes = (version.onnx_bytes, self._bytes[0])
            self._loaded = (version.name, st.previous.name if st.previous else None)
            blob = self._blob()
        else:
            st.held += 1
        st.save(meta)
        doc.update(st.counters())
        version.manifest["publication"] = doc
        return blob
