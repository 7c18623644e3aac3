"""Savepoints of a job on a Flink cluster, through the JobManager's REST API.

PyFlink 2.2's ``JobClient.trigger_savepoint`` and ``stop_with_savepoint`` call Java
methods without the savepoint-format argument that Flink's ``JobClient`` requires, so both
fail (docs/pyflink-notes.md). The REST API is what the Java ``RestClusterClient`` calls;
here it is called with an explicit savepoint format.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

TERMINAL = ("CANCELED", "FAILED", "FINISHED")


class SavepointError(RuntimeError):
    """A savepoint could not be taken; the message carries Flink's reason."""


def _call(
    address: str, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    req = urllib.request.Request(
        f"http://{address}{path}",
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        raise SavepointError(
            f"{method} {path} on {address}: {e.code} {e.read().decode()[:2000]}"
        ) from e
    except urllib.error.URLError as e:
        raise SavepointError(
            f"cannot reach the JobManager REST API at {address}: {e.reason}"
        ) from e


def _await(address: str, job_id: str, trigger: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        res = _call(address, "GET", f"/jobs/{job_id}/savepoints/{trigger}")
        if res.get("status", {}).get("id") == "COMPLETED":
            op = res.get("operation", {})
            if "location" in op:
                return str(op["location"])
            raise SavepointError(f"savepoint of job {job_id} failed: {json.dumps(op)[:3000]}")
        time.sleep(0.5)
    raise SavepointError(f"savepoint of job {job_id} not done after {timeout_s:.0f}s")


def _target(directory: str) -> str:
    return directory if "://" in directory else Path(directory).resolve().as_uri()


# Flink declines a checkpoint or savepoint while one of the job's tasks is starting or
# finishing (a bounded side input such as an empty catalogue source, a task restarting).
# That passes within seconds on a job that keeps running.
TRANSIENT_DECLINES = ("task is closing", "Not all required tasks are currently running")


def trigger_savepoint(
    address: str,
    job_id: str,
    directory: str,
    fmt: str = "CANONICAL",
    timeout_s: float = 300,
    retry_every_s: float = 1.0,
) -> str:
    """Take a savepoint of a running job; returns its location. A savepoint Flink declines
    only because a task is starting or finishing is triggered again while the job is
    RUNNING, until ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        res = _call(
            address,
            "POST",
            f"/jobs/{job_id}/savepoints",
            {"target-directory": _target(directory), "cancel-job": False, "formatType": fmt},
        )
        try:
            return _await(address, job_id, res["request-id"], deadline - time.monotonic())
        except SavepointError as e:
            try:
                state = _call(address, "GET", f"/jobs/{job_id}")["state"]
            except SavepointError:
                raise e from None  # the trigger's own failure says more than a 404 here
            if state in TERMINAL:
                raise SavepointError(
                    f"job {job_id} is {state}, so no savepoint can be taken of it (a bounded "
                    f"job ends by itself once it has read its input); Flink said: {e}"
                ) from e
            transient = any(reason in str(e) for reason in TRANSIENT_DECLINES)
            out_of_time = time.monotonic() + retry_every_s > deadline
            if not transient or state != "RUNNING" or out_of_time:
                raise
        time.sleep(retry_every_s)


def stop_with_savepoint(
    address: str,
    job_id: str,
    directory: str,
    fmt: str = "CANONICAL",
    drain: bool = False,
    timeout_s: float = 300,
) -> str:
    """Stop a job with a final savepoint (no drain: timers do not fire); returns its location."""
    res = _call(
        address,
        "POST",
        f"/jobs/{job_id}/stop",
        {"targetDirectory": _target(directory), "drain": drain, "formatType": fmt},
    )
    return _await(address, job_id, res["request-id"], timeout_s)


def cancel_job(address: str, job_id: str, timeout_s: float = 60.0) -> None:
    """Cancel a job (``PATCH /jobs/:id``) and wait until it has reached a terminal state."""
    _call(address, "PATCH", f"/jobs/{job_id}?mode=cancel")
    deadline = time.monotonic() + timeout_s
    while _call(address, "GET", f"/jobs/{job_id}")["state"] not in TERMINAL:
        if time.monotonic() > deadline:
            raise SavepointError(f"job {job_id} not cancelled after {timeout_s:.0f}s")
        time.sleep(0.2)
