"""`rtrec kafka up|status|down` and `rtrec replay` against a detached embedded broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from infra.kafka import read_topic


def rtrec(*args: str, cwd) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "PYFLINK" not in k}
    return subprocess.run(
        [sys.executable, "-m", "rtrec.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_detached_broker_lifecycle_and_replay(tmp_path, tiny_bert_dir):
    kdir = str(tmp_path / "k")
    up = rtrec("kafka", "up", "--dir", kdir, cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    bootstrap = up.stdout.strip().splitlines()[-1]
    assert bootstrap.startswith("127.0.0.1:")
    try:
        status = rtrec("kafka", "status", "--dir", kdir, cwd=tmp_path)
        assert status.returncode == 0 and bootstrap in status.stdout
        again = rtrec("kafka", "up", "--dir", kdir, cwd=tmp_path)
        assert "already running" in again.stdout

        rep = rtrec(
            "replay",
            "--kafka-dir",
            kdir,
            "--set",
            "replay.num_events=500",
            "--set",
            "replay.num_items=50",
            "--set",
            "replay.new_items_midstream=5",
            cwd=tmp_path,
        )
        assert rep.returncode == 0, rep.stderr
        assert "replayed 500 events (5 malformed) and 50 items" in rep.stdout
        events = read_topic(bootstrap, "events")
        assert len(events) == 505
        items = [json.loads(v) for v in read_topic(bootstrap, "items")]
        assert {i["item_id"] for i in items} == {f"item{n}" for n in range(50)}

        # Pretrain on a Kafka time range of what was replayed.
        valid_ts = sorted(json.loads(v)["ts"] for v in events if v.startswith(b'{"event_id":"e'))
        lo, hi = valid_ts[100], valid_ts[400]
        out = tmp_path / "init.pt"
        pre = rtrec(
            "pretrain",
            "--kafka-dir",
            kdir,
            "--from-ts",
            str(lo),
            "--to-ts",
            str(hi),
            "--out",
            str(out),
            "--set",
            f"model.text_encoder='{tiny_bert_dir}'",
            cwd=tmp_path,
        )
        assert pre.returncode == 0, pre.stderr[-3000:]
        summary = json.loads(pre.stdout[: pre.stdout.rindex("}") + 1])
        assert summary["samples"] == sum(lo <= t < hi for t in valid_ts)
        assert out.is_file()
    finally:
        down = rtrec("kafka", "down", "--dir", kdir, cwd=tmp_path)
    assert down.returncode == 0 and "stopped" in down.stdout
    gone = rtrec("kafka", "status", "--dir", kdir, cwd=tmp_path)
    assert gone.returncode == 1 and "not running" in gone.stdout


def test_replay_without_kafka_is_a_clear_error(tmp_path):
    proc = rtrec("replay", "--kafka-dir", str(tmp_path / "none"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "rtrec kafka up" in proc.stderr and "--bootstrap" in proc.stderr
