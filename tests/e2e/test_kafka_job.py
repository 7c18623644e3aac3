"""Real Kafka broker + the real job on local Flink + export + onnxruntime serving."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from flink_job.runner import run_local
from infra.kafka import read_topic
from models.registry import list_versions, read_latest
from models.serving import HotSwapRecommender
from replay.producer import replay
from serving.server import running

ROOT = Path(__file__).resolve().parents[2]


def test_events_in_models_out(kafka, make_cfg, tmp_path):
    cfg = make_cfg(
        "kafka.events_topic='e2e.events'",
        "kafka.items_topic='e2e.items'",
        "kafka.dlq_topic='e2e.dlq'",
        "kafka.models_topic='e2e.models'",
        "kafka.bounded=true",
        "replay.num_events=3000",
        "replay.num_users=80",
        "replay.num_items=150",
        "trainer.export_every_steps=15",
        "job.checkpoint_interval_ms=2000",
    )
    stats = replay(cfg, kafka.bootstrap, progress=False)
    assert stats.malformed > 10

    result = run_local(cfg, kafka.bootstrap, timeout_s=600)
    assert result.status == "FINISHED"

    # N valid events in -> N events trained on, each exactly once.
    assert result.manifest is not None
    assert result.manifest["events_seen"] == stats.events

    # Every malformed record is in the DLQ with a reason and its original payload.
    dlq = [json.loads(v) for v in read_topic(kafka.bootstrap, "e2e.dlq")]
    assert len(dlq) == stats.malformed
    assert all(d["reason"] and d["source"] == "e2e.events" and "payload" in d for d in dlq)

    # At least two versions, in the registry and (transactionally) in the models topic.
    registry = Path(cfg.export.registry_dir)
    names = list_versions(registry, "default")
    assert len(names) >= 2
    published = [json.loads(v) for v in read_topic(kafka.bootstrap, "e2e.models", True)]
    assert sorted(p["name"] for p in published) == names
    assert all(p["type"] == "version" for p in published)  # no revocation on a clean stream
    last = max(
        (p for p in published if p["status"] == "published"), key=lambda p: p["manifest"]["version"]
    )
    assert last["name"] == read_latest(registry, "default")
    onnx_from_kafka = base64.b64decode(last["onnx_base64"])
    assert onnx_from_kafka == (registry / "default" / last["name"] / "model.onnx").read_bytes()

    # The latest version loads in onnxruntime and ranks items for a user's history.
    rec = HotSwapRecommender(registry, "default")
    assert rec.refresh()
    user = max(stats.histories, key=lambda u: len(stats.histories[u]))
    hist = stats.histories[user][-20:]
    top = rec.recommend([hist], k=10)[0]
    assert len({i for i, _ in top}) == 10 and not {i for i, _ in top} & set(hist)
    assert [s for _, s in top] == sorted((s for _, s in top), reverse=True)

    # ...and over HTTP, as `rtrec serve` does it (GET and POST).
    with running(rec) as (_, port):
        url = f"http://127.0.0.1:{port}/recommend?history={','.join(hist)}&k=5"
        body = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert body["version"] == rec.version_name and len(body["items"]) == 5
        # `exclude` leaves out what the caller names; the next best items move up.
        shown = [i for i, _ in body["items"][:2]]
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/recommend",
            data=json.dumps({"history": hist, "exclude": shown, "k": 3}).encode(),
            headers={"Content-Type": "application/json"},
        )
        body = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert [i for i, _ in body["items"]] == [i for i, _ in top[2:5]]


def test_readme_demo_command(tmp_path):
    """`rtrec demo` (the README's main command) runs end to end and prints recommendations."""
    # An earlier in-process Flink job leaves PYFLINK_* markers (loopback workers) that would
    # stop a child process from starting its own gateway.
    env = {k: v for k, v in os.environ.items() if "PYFLINK" not in k}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rtrec.cli",
            "demo",
            "--set",
            "replay.num_events=2500",
            "--set",
            "replay.malformed_fraction=0.02",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert "loaded with onnxruntime" in out
    assert len(re.findall(r"^\s+\d+\. ", out, flags=re.M)) == 30  # 3 users x top-10
    summary = re.search(r"summary: events=(\d+) malformed=(\d+) samples=(\d+).* dlq=(\d+)", out)
    assert summary, out[-2000:]
    events, malformed, samples, dlq = map(int, summary.groups())
    assert events == samples == 2500 and malformed == dlq == 50


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _torch_workers() -> set[int]:
    """This process's descendants that have loaded torch (Python workers of trainers)."""
    out = set()
    for pid in _descendants(os.getpid()):
        try:
            if b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes():
                out.add(pid)
        except OSError:
            continue
    return out


def test_a_local_run_reports_each_restart_and_still_learns_every_event_once(kafka, make_cfg, capfd):
    """kill -9 of the trainer's Python worker in a local run: the job restarts from its
    last checkpoint by itself, the progress output says when, why and from which
    checkpoint, and every event is still learned exactly once."""
    import signal
    import threading
    import time

    cfg = make_cfg(
        "kafka.events_topic='e2e.r.events'",
        "kafka.items_topic='e2e.r.items'",
        "kafka.dlq_topic='e2e.r.dlq'",
        "kafka.models_topic='e2e.r.models'",
        "kafka.bounded=true",
        "replay.num_events=30000",
        "replay.num_users=300",
        "model.text_encoder='none'",
        "trainer.export_every_steps=5",
        "job.checkpoint_interval_ms=1000",
    )
    stats = replay(cfg, kafka.bootstrap, progress=False)
    # Workers of earlier tests' clusters may still be shutting down: not this run's.
    earlier = _torch_workers()
    out: dict = {}
    runner = threading.Thread(
        target=lambda: out.update(result=run_local(cfg, kafka.bootstrap, timeout_s=600)),
        daemon=True,
    )
    runner.start()
    registry = Path(cfg.export.registry_dir)
    deadline = time.monotonic() + 300
    # Two versions, then a few checkpoint intervals: a checkpoint has completed.
    while len(list_versions(registry, "default")) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(5)
    fresh = _torch_workers() - earlier
    assert len(fresh) == 1, f"this run's trainer worker not found: {fresh} (earlier: {earlier})"
    pid = fresh.pop()
    os.kill(pid, signal.SIGKILL)
    runner.join(600)
    result = out["result"]
    assert result.status == "FINISHED"
    assert result.manifest is not None and result.manifest["events_seen"] == stats.events
    assert len(result.restarts) >= 1
    first = result.restarts[0]
    assert first.cause and first.restored_checkpoint is not None
    err = capfd.readouterr().err
    assert re.search(r"restart 1: failed at \d\d:\d\d:\d\d", err), err[-3000:]
    assert f"restored from checkpoint {first.restored_checkpoint}" in err
    assert "(restarts: 1)" in err


def test_forgetting_a_user_through_kafka(kafka, make_cfg):
    """`rtrec forget` puts a request on the control topic; the job drops the user's events
    up to it that were still pending and learns their later ones as a new user's."""
    from replay.datasets import _event_record, synthetic
    from rtrec.cli import main

    topics = [
        "kafka.events_topic='e2e.f.events'",
        "kafka.items_topic='e2e.f.items'",
        "kafka.dlq_topic='e2e.f.dlq'",
        "kafka.models_topic='e2e.f.models'",
        "kafka.control_topic='e2e.f.control'",
    ]
    cfg = make_cfg(
        *topics,
        "kafka.bounded=true",
        "replay.num_events=2000",
        "replay.malformed_fraction=0.0",
        "model.text_encoder='none'",
        "job.window_ms=3600000",
        "job.checkpoint_interval_ms=2000",
    )
    records = list(synthetic(cfg.replay))
    last = max(r.ts for r in records)
    alice = [
        _event_record(f"a{i}", "alice", "item1", "click", last + 1000 * (i + 1), None)
        for i in range(7)
    ]
    stats = replay(cfg, kafka.bootstrap, progress=False, source=records + alice)
    sets = [a for t in topics for a in ("--set", t)]
    assert (
        main(["forget", "alice", "--ts", str(last + 4500), "--bootstrap", kafka.bootstrap, *sets])
        == 0
    )
    result = run_local(cfg, kafka.bootstrap, timeout_s=600)
    assert result.status == "FINISHED"
    assert result.manifest["events_seen"] == stats.events - 4
