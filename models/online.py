"""One call per trainer firing: rebuild the cache if needed, learn, maybe export.

This is the single entry point the Flink trainer function (and offline replays) use,
so stream and offline runs execute exactly the same learning code.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from models.export import ModelVersion, NonFiniteModelError, build_version
from models.history import Sample
from models.trainer import OnlineLearner, StepResult

log = logging.getLogger(__name__)


@dataclass
class Firing:
    result: StepResult
    version: ModelVersion | None


def train_and_maybe_export(
    learner: OnlineLearner,
    meta: dict[str, Any],
    samples: list[Sample],
    dense_blob: Callable[[], bytes | None],
    rows: Callable[[], Iterable[tuple[str, bytes]]],
    top_k: int,
    config: dict[str, Any],
    force_export: bool = False,
) -> Firing:
    """Learn from ``samples`` (may be empty) and export a version when due.

    ``meta`` is updated in place (step, counters, version); the caller persists it
    together with ``result.touched_rows`` and ``result.dense_blob``.
    """
    learner.ensure_loaded(meta, dense_blob, rows)
    result = learner.learn(samples, meta) if samples else StepResult()
    version = None
    due = learner.export_due(meta) or (force_export and meta["step"] > meta["last_export_step"])
    if due and len(learner.table) > 0:
        try:
            version = build_version(learner, meta, top_k, config)
        except NonFiniteModelError as e:
            log.error("%s", e)
        else:
            meta["version"] = version.version
            meta["last_export_step"] = meta["step"]
            meta["last_export_wall"] = time.time()
            meta["samples_since_export"] = 0
    return Firing(result, version)
