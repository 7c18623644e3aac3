"""Restarts of a running job, read from the Flink REST API, for progress output.

Flink restarts a failed job from its last checkpoint by itself; without this a local run's
progress lines went on as if nothing had happened. :class:`RestartWatcher` reads the job's
exception history (when each failure happened and the cause Flink recorded) and its
checkpoint statistics (which checkpoint the job restored from), so that each restart can
be reported once. Flink's own job metric ``numRestarts`` counts the same restarts.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any


@dataclass
class Restart:
    """One failure the job recovered (or is recovering) from."""

    at_ms: int
    cause: str
    task: str
    restored_checkpoint: int | None = None
    restored_path: str | None = None
    # No checkpoint had completed when it failed: the job starts over from its input's start.
    from_start: bool = False

    def describe(self) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(self.at_ms / 1000))
        where = f" in {self.task}" if self.task else ""
        if self.from_start:
            restored = "no checkpoint had completed: restarting from the start of the input"
        elif self.restored_checkpoint is None:
            restored = "restoring from the last completed checkpoint"
        else:
            restored = f"restored from checkpoint {self.restored_checkpoint}"
            if self.restored_path:
                restored += f" ({self.restored_path})"
        return f"failed at {when}{where}: {self.cause}; {restored}"


def _cause(entry: dict[str, Any]) -> str:
    """The recorded exception's name and the first line of its trace that says what."""
    name = str(entry.get("exceptionName") or "unknown failure")
    trace = str(entry.get("stacktrace") or "")
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip()]
    # The deepest "Caused by" says most: a killed Python worker shows up as a failed
    # checkpoint or bundle on top, with the lost connection underneath.
    causes = [ln[len("Caused by: ") :] for ln in lines if ln.startswith("Caused by: ")]
    first = next((ln for ln in lines if not ln.startswith("at ")), name)
    text = first if not causes else f"{first.split(' for operator ')[0]}; caused by {causes[-1]}"
    return text[:300]


def _task(entry: dict[str, Any]) -> str:
    """The failed task's operator (the head of its chain) and subtask."""
    name = str(entry.get("taskName") or "")
    head = name.split(" -> ")[0]
    subtask = name.rsplit(" (", 1)[1].split(")")[0] if " (" in name else ""
    return f"{head} ({subtask})" if subtask and head != name else head


class RestartWatcher:
    """Polls ``http://<rest>/jobs/<job_id>/exceptions`` and ``/checkpoints``."""

    def __init__(self, rest_address: str, job_id: str) -> None:
        self.base = f"http://{rest_address}/jobs/{job_id}"
        self.restarts: list[Restart] = []
        self._restore_seen: int | None = None

    def _get(self, path: str) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(self.base + path, timeout=2) as resp:
                doc = json.loads(resp.read())
                return doc if isinstance(doc, dict) else None
        except (OSError, urllib.error.URLError, ValueError):
            return None  # the REST endpoint starts late and goes when the job ends

    def poll(self) -> list[str]:
        """Lines to report: each new failure, and the checkpoint each restart restored."""
        lines: list[str] = []
        cps = self._get("/checkpoints")
        completed = int(((cps or {}).get("counts") or {}).get("completed", 0))
        exc = self._get("/exceptions")
        entries = (exc or {}).get("exceptionHistory", {}).get("entries", [])
        known = {r.at_ms for r in self.restarts}
        for e in sorted(entries, key=lambda e: int(e.get("timestamp", 0))):
            ts = int(e.get("timestamp", 0))
            if ts in known:
                continue
            r = Restart(ts, _cause(e), _task(e), from_start=cps is not None and completed == 0)
            self.restarts.append(r)
            lines.append(f"restart {len(self.restarts)}: {r.describe()}")
        restored = ((cps or {}).get("latest") or {}).get("restored")
        if restored and restored.get("restore_timestamp") != self._restore_seen:
            self._restore_seen = restored.get("restore_timestamp")
            pending = [r for r in self.restarts if r.restored_checkpoint is None]
            if pending:
                r = pending[-1]
                r.restored_checkpoint = int(restored["id"])
                r.restored_path = restored.get("external_path")
                lines.append(f"restart {self.restarts.index(r) + 1}: {r.describe()}")
        return lines
