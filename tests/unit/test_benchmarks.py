"""The no-Flink benchmark scripts run end to end at tiny sizes and write valid JSON.

(The benchmarks themselves are not tests: `rtrec bench` runs them; see README "Benchmarks".)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run(script: str, out: Path, *args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RTREC_DEVICE": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((out / script.replace(".py", ".json")).read_text())
    assert doc["benchmark"] == script.removesuffix(".py")
    assert doc["machine"]["cpus"] >= 1
    assert doc["headline"] in proc.stdout
    return doc


def test_catalogue_script_writes_json(tmp_path: Path) -> None:
    doc = run("catalogue.py", tmp_path, "--sizes", "200,400", "--samples", "128", "--exports", "1")
    rows = doc["rows"]
    assert [r["items"] for r in rows] == [200, 400]
    assert all(r["learn_samples_per_s"] > 0 and r["export_s"] > 0 for r in rows)
    assert rows[0]["learn_vs_smallest"] == pytest.approx(1.0)


def test_gpu_script_writes_json(tmp_path: Path) -> None:
    doc = run(
        "gpu.py",
        tmp_path,
        "--items",
        "200",
        "--samples",
        "128",
        "--texts",
        "16",
        "--encoder",
        "none",
    )
    assert doc["device_name"] == "cpu"
    (row,) = doc["rows"]
    assert row["trainer_samples_per_s"] > 0 and row["trainer_vs_cpu"] == pytest.approx(1.0)


def test_config_file_becomes_overrides_including_tables(tmp_path: Path) -> None:
    """``--config F`` turns every key of F into a ``--set`` override the config loader
    accepts, nested tables (``[job.flink]``) included."""
    sys.path.insert(0, str(BENCH))
    try:
        import _common as C
    finally:
        sys.path.remove(str(BENCH))
    f = tmp_path / "profile.toml"
    f.write_text(
        '[job]\nwindow_ms = 100\n[job.flink]\n"pipeline.auto-watermark-interval" = "50 ms"\n'
        "[trainer]\nflush_after_seconds = 0.25\n"
    )
    args = C.parser("x", "doc").parse_args(["--config", str(f), "--set", "job.window_ms=300"])
    cfg = C.config(args.set)
    assert cfg.job.flink == {"pipeline.auto-watermark-interval": "50 ms"}
    assert cfg.trainer.flush_after_seconds == 0.25
    assert cfg.job.window_ms == 300  # a later --set wins


def test_recovery_refuses_a_late_replacement_without_a_standby() -> None:
    """``--replace after-recovery`` needs free slots to recover on (a standby TaskManager):
    without one the job could only wait for a replacement that is not started yet."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "recovery.py"), "--replace", "after-recovery"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--replace after-recovery needs --spare-taskmanagers >= 1" in proc.stderr
