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


def test_throughput_window_starts_once_the_catalogue_is_in() -> None:
    """The job's steady window starts at the first firing that learned something with the
    initial catalogue ingested (its bootstrap is a one-off, like compute-only's); the rate
    with the bootstrap is reported too. Firings: (wall s, events_seen, items_ingested)."""
    sys.path.insert(0, str(BENCH))
    try:
        from throughput import steady_rate
    finally:
        sys.path.remove(str(BENCH))
    firings = [
        (0.0, 0, 500),  # catalogue only
        (1.0, 64, 900),  # learned, catalogue still arriving (being embedded)
        (9.0, 128, 1000),  # catalogue complete
        (10.0, 1128, 1010),
        (11.0, 2128, 1040),  # the final count, reached first here
        (12.0, 2128, 1040),  # end-of-input firing with nothing new
    ]
    steady, with_bootstrap = steady_rate(firings, catalogue=1000)
    assert steady == {"start": 9.0, "steady_s": 2.0, "events_per_s": 1000.0}
    assert with_bootstrap == {"start": 1.0, "steady_s": 10.0, "events_per_s": 206.4}
    never, same = steady_rate(firings, catalogue=5000)  # no complete catalogue: no cut
    assert never == same == with_bootstrap
    with pytest.raises(RuntimeError, match="too few events"):
        steady_rate(firings[:2], catalogue=0)
