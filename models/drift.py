"""Drift detection on the prequential loss: a Page-Hinkley test.

The trainer feeds one observation per gradient step: the batch's loss measured *before*
the step (test-then-train). Page-Hinkley accumulates how far each observation lies above
the running mean (minus a tolerance ``delta``); when that cumulative excess rises more
than ``threshold`` above its lowest point, the loss has shifted upwards - the stream's
behaviour changed faster than the model follows - and the detector fires and restarts.

The mean is a running mean over at most ``memory`` observations (an exponential window
once ``memory`` is reached), so a loss that fell a lot early on does not hide a later
rise. All state is a few floats, stored in the trainer's meta state (``as_state`` /
``from_state``), so detections are exact across restores and deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DRIFT_STATE_FORMAT = 1


# Weight of the newest observation in the "recent" moving averages of a trainer's metrics
# (models/metrics.py) and of its publication gate (models/gate.py): one meaning for both.
EMA_ALPHA = 0.02


def moving_average(old: float | None, x: float) -> float:
    """The exponential moving average after observing ``x`` (``x`` itself at first)."""
    return x if old is None else (1.0 - EMA_ALPHA) * old + EMA_ALPHA * x


@dataclass
class PageHinkley:
    """Page-Hinkley test for an upward shift of a stream of observations.

    delta: tolerated excess over the mean per observation (same unit as the observations).
    threshold: cumulative excess (lambda) above its minimum that signals a drift.
    min_samples: observations since the last (re)start before the detector may fire.
    memory: the running mean weighs at most the last ~``memory`` observations.
    """

    delta: float = 0.01
    threshold: float = 1.5
    min_samples: int = 30
    memory: int = 200
    n: int = 0
    mean: float = 0.0
    cum: float = 0.0
    min_cum: float = 0.0

    def update(self, x: float) -> bool:
        """Add one observation; True when a drift is detected (the test then restarts)."""
        self.n += 1
        self.mean += (x - self.mean) / min(self.n, max(1, self.memory))
        self.cum += x - self.mean - self.delta
        self.min_cum = min(self.min_cum, self.cum)
        if self.n >= self.min_samples and self.statistic > self.threshold:
            self.reset()
            return True
        return False

    @property
    def statistic(self) -> float:
        """PH_t = m_t - min_{s<=t} m_s: how far the cumulative excess rose above its low."""
        return self.cum - self.min_cum

    def reset(self) -> None:
        self.n, self.mean, self.cum, self.min_cum = 0, 0.0, 0.0, 0.0

    def as_state(self) -> dict[str, Any]:
        """The statistics (not the settings) as a small dict for the trainer's meta state."""
        return {
            "format": DRIFT_STATE_FORMAT,
            "n": self.n,
            "mean": self.mean,
            "cum": self.cum,
            "min_cum": self.min_cum,
        }

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any] | None,
        delta: float,
        threshold: float,
        min_samples: int,
        memory: int = 200,
    ) -> PageHinkley:
        """A detector with the given settings and the statistics of ``state`` (None = new)."""
        ph = cls(delta, threshold, min_samples, memory)
        if state is None:
            return ph
        if state.get("format") != DRIFT_STATE_FORMAT:
            raise ValueError(
                f"drift detector state has format {state.get('format')}, this release reads "
                f"{DRIFT_STATE_FORMAT}; restore from a compatible savepoint"
            )
        ph.n, ph.mean = int(state["n"]), float(state["mean"])
        ph.cum, ph.min_cum = float(state["cum"]), float(state["min_cum"])
        return ph
