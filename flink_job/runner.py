"""Run the job on a local Flink mini-cluster with periodic progress lines, including
each restart after a failure (flink_job/restarts.py)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flink_job.config import AppConfig
from flink_job.job import build_job, make_env
from flink_job.restarts import Restart, RestartWatcher
from infra.kafka import free_port
from models.registry import list_versions

log = logging.getLogger(__name__)


def progress(line: str) -> None:
    """A progress line on stderr. Not through logging: the in-process Python workers of a
    local Flink run reconfigure the root logger."""
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


@dataclass
class RunResult:
    status: str
    elapsed_s: float
    first_version_s: float | None
    manifest: dict[str, Any] | None
    # Each failure the job restarted from: when, the cause Flink recorded, the checkpoint.
    restarts: list[Restart] = field(default_factory=list)


def latest_manifest(cfg: AppConfig) -> dict[str, Any] | None:
    """The manifest of the newest version the trainer made, published or held by the
    gate (progress is the trainer's, whatever serves)."""
    root = Path(cfg.export.registry_dir)
    names = list_versions(root, cfg.job.model_key)
    if not names:
        return None
    name = names[-1]
    try:
        return json.loads((root / cfg.job.model_key / name / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run_local(
    cfg: AppConfig,
    bootstrap: str,
    expected_events: int | None = None,
    progress_every_s: float = 3.0,
    timeout_s: float | None = None,
    extra_conf: dict[str, str] | None = None,
) -> RunResult:
    """Submit the job to a local mini-cluster and wait, logging progress, until it ends.

    With ``kafka.bounded`` the job ends by itself once it has consumed what was in the
    topic at start; otherwise it runs until interrupted (Ctrl-C cancels it).
    """
    conf = dict(extra_conf or {})
    if "rest.port" not in {**cfg.job.flink, **conf}:
        # The mini-cluster's REST endpoint (loopback only): how restarts are seen.
        conf.update({"rest.port": str(free_port()), "rest.bind-address": "127.0.0.1"})
    conf.setdefault("rest.address", "127.0.0.1")
    rest = f"{conf['rest.address']}:{conf.get('rest.port', cfg.job.flink.get('rest.port'))}"
    env = make_env(cfg, conf)
    build_job(env, cfg, bootstrap)
    t0 = time.monotonic()
    client = env.execute_async(cfg.job.name)
    job_id = str(client.get_job_id())
    progress(f"job {job_id} submitted to the local Flink mini-cluster (REST http://{rest})")
    watcher = RestartWatcher(rest, job_id)
    outcome: dict[str, Any] = {}

    def wait() -> None:
        # The local mini-cluster shuts down with the job, so status polling would race it;
        # waiting on the execution result is the reliable end signal.
        try:
            client.get_job_execution_result().result()
            outcome["status"] = "FINISHED"
        except Exception as e:
            outcome["status"] = "CANCELED" if "cancel" in str(e).lower() else "FAILED"
            outcome["error"] = e

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    first_version: float | None = None
    last_print = 0.0
    try:
        while True:
            waiter.join(0.5)
            done = not waiter.is_alive()
            now = time.monotonic() - t0
            m = latest_manifest(cfg)
            if m is not None and first_version is None:
                first_version = now
            if now - last_print >= progress_every_s or done:
                last_print = now
                for line in watcher.poll():
                    progress(f"[{now:5.1f}s] {line}")
                state = outcome.get("status", "RUNNING")
                if watcher.restarts:
                    state += f" (restarts: {len(watcher.restarts)})"
                if m is None:
                    progress(f"[{now:5.1f}s] {state}: no model version yet")
                else:
                    total = f"/{expected_events}" if expected_events else ""
                    recall = m["metrics"]["prequential_recall10_ema"] or 0.0
                    progress(
                        f"[{now:5.1f}s] {state}: trained on {m['events_seen']}{total} events, "
                        f"{m['steps']} steps, version {m['version']}, recall@10 {recall:.3f}"
                    )
            if done:
                break
            if timeout_s is not None and now > timeout_s:
                client.cancel().result()
                waiter.join(30)
                raise TimeoutError(f"job did not finish within {timeout_s:.0f}s; cancelled")
    except KeyboardInterrupt:
        log.warning("interrupted: cancelling the job")
        client.cancel().result()
        waiter.join(30)
    status = outcome.get("status", "CANCELED")
    if status == "FAILED":
        raise RuntimeError(f"the Flink job failed: {str(outcome.get('error'))[-3000:]}")
    return RunResult(
        status, time.monotonic() - t0, first_version, latest_manifest(cfg), watcher.restarts
    )
