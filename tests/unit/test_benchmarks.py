"""The no-Flink benchmark scripts run end to end at tiny sizes and write valid JSON; the
renderer turns results into tables, and docs/benchmarks.md is up to date with the
committed ones.

(The benchmarks themselves are not tests: `rtrec bench` runs them; see docs/benchmarks.md.)
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

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
    # What ran, where and when, for the renderer.
    assert doc["command"]["argv"].startswith(f"python benchmarks/{script}")
    assert set(doc["commit"]) == {"sha", "dirty"}
    assert doc["utc"].endswith("Z")
    assert {"loadavg_at_start", "loadavg_at_end", "os", "python", "torch", "pyflink"} <= set(
        doc["machine"]
    )
    assert doc["config"]["resolved"]
    assert all(f["value"] is not None for f in doc["figures"])
    return doc


def test_quality_script_reports_online_against_the_strongest_baseline(tmp_path: Path) -> None:
    doc = run("quality.py", tmp_path, "--quick", "--set", "replay.num_events=1200")
    head = [f for f in doc["figures"] if f["headline"]]
    assert [f["figure"] for f in head] == ["online Recall@10", "online NDCG@10"]
    for f, metric in zip(head, ("recall@10", "ndcg@10"), strict=True):
        strongest = max(
            (v[metric], name) for name, v in doc["eval"].items() if name not in ("online", "frozen")
        )
        assert f["baseline"] == f"strongest baseline ({strongest[1]})"
        assert f["baseline_value"] == strongest[0] and f["value"] == doc["eval"]["online"][metric]
    assert doc["config"]["resolved"]["replay"]["num_events"] == 1200


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
    # The exported version ranked through the serving class, on the CPU's provider here.
    assert row["onnx_rankings_per_s"] > 0 and row["onnx_provider"] == "CPUExecutionProvider"


def test_bench_reports_gpu_as_skipped_without_a_gpu(tmp_path: Path) -> None:
    """``rtrec bench`` runs gpu.py with --skip-without-gpu: on the CPU it measures nothing,
    says why, and the summary reports it as skipped rather than failed."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--only", "gpu", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RTREC_DEVICE": "cpu"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert "no GPU" in doc["skipped"] and doc["rows"] == [] and doc["figures"] == []
    assert doc["command"]["argv"].startswith("python benchmarks/gpu.py")
    assert doc["command"]["via"].startswith("rtrec bench --only gpu")
    assert re.search(r"^\| gpu +\| skipped +\|", proc.stdout, re.MULTILINE), proc.stdout


def _bench_module(name: str):
    """A module of benchmarks/ (scripts, not a package: imported from their folder)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def _common():
    return _bench_module("_common")


def test_config_file_becomes_overrides_including_tables(tmp_path: Path) -> None:
    """``--config F`` turns every key of F into a ``--set`` override the config loader
    accepts, nested tables (``[job.flink]``) included."""
    C = _common()
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


def test_trainer_timeline_counts_each_firing_in_the_second_it_ended() -> None:
    """Events learned per second from the first firing; a second without a firing is a
    stall (0), and the first firing's own events are before the window, as for the
    steady rate."""
    T = _bench_module("throughput")
    firings = [(100.0, 64), (100.4, 320), (100.9, 576), (101.5, 832), (103.2, 1088)]
    assert T.learning_timeline(firings) == [(0.0, 512.0), (1.0, 256.0), (2.0, 0.0), (3.0, 256.0)]
    assert sum(v for _, v in T.learning_timeline(firings)) == 1088 - 64
    assert T.learning_timeline(firings, bucket_s=2.0) == [(0.0, 384.0), (2.0, 128.0)]
    assert T.learning_timeline(firings[:1]) == []


def test_throughput_plot_has_a_panel_per_encoder(tmp_path: Path) -> None:
    T = _bench_module("throughput")

    def run(rate: float) -> dict:
        return {"events_per_s": rate, "timeline": [(0.0, rate), (1.0, 0.0), (2.0, rate)]}

    rows = [
        {
            "encoder": enc,
            "parallelism": par,
            "passthrough_events_per_s": 20_000.0,
            "job": run(4_000.0),
            "upstream": run(7_000.0),
        }
        for enc in ("minilm", "none")
        for par in (1, 2)
    ]
    path = tmp_path / "throughput.png"
    T.plot_timelines(rows, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as im:
        assert im.height > im.width * 0.5  # two panels stacked (one per encoder)


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


# A child that burns CPU for a while; the trailing argument puts a Python worker's module
# name in its command line, as PyFlink's workers have.
_BURN = (
    "import sys, time\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < float(sys.argv[1]): pass"
)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_process_cpu_counts_descendants_by_kind_and_only_after_start() -> None:
    """ProcessCPU charges a run with the CPU its child processes use after start(), per
    kind (a process that ended between polls is counted up to its last poll), and not with
    what a process used before start()."""
    C = _common()
    assert C.cpu_kind("/usr/bin/java -cp x kafka.Kafka server.properties") == "kafka"
    assert C.cpu_kind("/opt/jdk/bin/java -cp flink.jar org.apache.flink.Foo") == "flink_jvm"
    assert C.cpu_kind("/usr/bin/python -m pyflink.fn_execution.beam.beam_boot --id=1") == (
        "python_worker"
    )
    # Runs before and during the measurement: only the part after start() counts.
    early = subprocess.Popen([sys.executable, "-c", _BURN, "1.2", "pyflink.fn_execution.x"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until it has used 0.6 s (however busy the machine)
        mine = [v for (pid, _), v in C._proc_table().items() if pid == early.pid]
        if mine and mine[0][2] >= 0.6:
            break
        time.sleep(0.02)
    cpu = C.ProcessCPU(interval_s=0.05)
    cpu.start()
    worker = subprocess.Popen([sys.executable, "-c", _BURN, "0.5", "pyflink.fn_execution.y"])
    assert worker.wait(timeout=60) == 0
    other = subprocess.Popen([sys.executable, "-c", _BURN, "0.3"])
    assert other.wait(timeout=60) == 0
    assert early.wait(timeout=60) == 0
    r = cpu.result()
    assert r is not None
    # Other descendants of this process (a test session's Kafka broker, say) may be counted
    # too: check this test's own children by pid, then that the totals add up.
    seen = {pid: v for (pid, _), v in cpu._seen.items()}
    assert C.cpu_kind(seen[worker.pid][0]) == C.cpu_kind(seen[early.pid][0]) == "python_worker"
    assert C.cpu_kind(seen[other.pid][0]) == "other"
    assert 0.4 <= seen[worker.pid][1] <= 0.95  # 0.5 s, plus its interpreter's start-up
    assert 0.4 <= seen[early.pid][1] <= 0.95  # at most 0.6 s of its 1.2 s after start()
    assert seen[other.pid][1] >= 0.25
    assert len(r["python_workers_s"]) >= 2 and r["other_s"] >= 0.25
    parts = ("client_s", "flink_jvm_s", "kafka_s", "other_s")
    total = sum(r[k] for k in parts) + sum(r["python_workers_s"])
    assert r["total_s"] == pytest.approx(total, abs=0.05)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_process_cpu_rate_uses_the_polls_inside_the_window() -> None:
    """The steady-state figure: cores in use between the first and the last poll inside
    the window, so that start-up before it and the tail after it are left out."""
    cpu = _common().ProcessCPU()
    polls = [(0.0, 0.0), (1.0, 0.5), (2.0, 1.5), (3.0, 1.6)]
    cpu._per_process = [(t, {"client": c}) for t, c in polls]
    assert cpu.rate(0.5, 2.5) == pytest.approx(1.0)
    assert cpu.rate(0.0, 3.0) == pytest.approx(1.6 / 3)
    assert cpu.rate(1.5, 2.5) is None  # one poll: no rate


def _two_workers_and_a_jvm():
    """A ProcessCPU that has seen two Python workers and a Flink JVM (no polls yet)."""
    cpu = _common().ProcessCPU()
    w1, w2, jvm = (10, 1), (11, 1), (12, 1)
    cpu._seen = {
        w1: ("python -m pyflink.fn_execution.beam.beam_boot", 0.0),
        w2: ("python -m pyflink.fn_execution.beam.beam_boot", 0.0),
        jvm: ("/usr/bin/java -cp flink.jar Main", 0.0),
    }
    return cpu, w1, w2, jvm


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_process_cpu_cores_per_process_kind() -> None:
    """Per-kind cores in a window: each Python worker on its own (the one near 1.0 is the
    limiting stage), the JVMs and this process summed by kind."""
    cpu, w1, w2, jvm = _two_workers_and_a_jvm()
    cpu._per_process = [
        (0.0, {"client": 0.0, w1: 1.0, jvm: 2.0}),
        (1.0, {"client": 0.1, w1: 1.5, jvm: 2.5, w2: 0.0}),
        (3.0, {"client": 0.3, w1: 3.5, jvm: 3.5, w2: 0.6}),
    ]
    r = cpu.cores(0.5, 3.0)  # between the polls at 1.0 and 3.0
    assert r == {
        "client": 0.1,
        "flink_jvm": 0.5,
        "kafka": 0.0,
        "other": 0.0,
        "python_workers": [1.0, 0.3],
    }


# Two of these on one CPU: each is runnable the whole time and waits about half of it.
_PINNED_BURN = (
    "import os, sys, time\n"
    "os.sched_setaffinity(0, {int(sys.argv[2])})\n"
    "t = time.process_time()\n"
    "while time.process_time() - t < float(sys.argv[1]): pass"
)


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_process_cpu_measures_the_wait_for_a_cpu() -> None:
    """Two busy processes pinned to one CPU: each waits in the run queue for about as long
    as the other runs, which ProcessCPU records per process."""
    C = _common()
    cpu_id = min(os.sched_getaffinity(0))
    cpu = C.ProcessCPU(interval_s=0.05)
    cpu.start()
    kids = [
        subprocess.Popen([sys.executable, "-c", _PINNED_BURN, "0.8", str(cpu_id), tag])
        for tag in ("pyflink.fn_execution.a", "pyflink.fn_execution.b")
    ]
    assert all(k.wait(timeout=60) == 0 for k in kids)
    cpu.result()
    waited = {k.pid: 0.0 for k in kids}
    for _, waits in cpu._run_queue:
        for (pid, _), w in ((key, w) for key, w in waits.items() if key != "client"):
            if pid in waited:
                waited[pid] = max(waited[pid], w)
    # Each ran ~0.8 s while the other was runnable on the same CPU. (Which polls fall in
    # a window depends on how busy the machine is: the window arithmetic is the next test.)
    assert sum(waited.values()) >= 0.6, waited


def test_process_cpu_waiting_per_process_kind() -> None:
    """The run-queue figure of a window: growth per second per process, by kind, the
    workers in the order of their cores (busiest first)."""
    cpu, w1, w2, jvm = _two_workers_and_a_jvm()
    cpu._per_process = [
        (0.0, {"client": 0.0, w1: 0.0, w2: 0.0, jvm: 0.0}),
        (2.0, {"client": 0.0, w1: 1.6, w2: 0.4, jvm: 0.0}),
    ]
    cpu._run_queue = [
        (0.0, {"client": 0.0, w1: 1.0, w2: 0.0, jvm: 2.0}),
        (2.0, {"client": 0.2, w1: 2.0, w2: 1.6, jvm: 2.0}),
    ]
    assert cpu.cores(0.0, 2.0)["python_workers"] == [0.8, 0.2]
    assert cpu.waiting(0.0, 2.0) == {
        "client": 0.1,
        "flink_jvm": 0.0,
        "kafka": 0.0,
        "other": 0.0,
        "python_workers": [0.5, 0.8],  # w1, then w2: the order of their cores
    }


# ------------------------------------------------------------------------------ render.py
def _fixture_result(C) -> dict:
    """A result as write_result writes it, with made-up figures."""
    return {
        "benchmark": "throughput",
        "quick": False,
        "utc": "2000-01-01T00:00:00Z",
        "command": {"argv": "python benchmarks/throughput.py --events 5000", "via": None},
        "commit": {"sha": "0123456789abcdef0123456789abcdef01234567", "dirty": False},
        "config": {"overrides": ["job.bundle_size=5000"], "resolved": {}},
        "machine": {
            "cpu": "Test CPU 9000", "cpus": 4, "mem_gb": 16.0, "gpu": None, "os": "Linux 6",
            "python": "3.11.7", "torch": "2.15.0", "pyflink": "2.2.1",
            "loadavg_at_start": [0.5, 0.25, 0.1], "loadavg_at_end": [1.5, 0.75, 0.3],
        },
        "figures": [
            C.figure("job, p1, id-only", 1234.6, "events/s", "pass-through", 4938.0,
                     headline=True),
            C.figure("job CPU per event", 812.25, "us"),
        ],
        "headline": "job 1234 events/s",
    }  # fmt: skip


def test_render_puts_a_result_s_figures_in_a_table(tmp_path: Path) -> None:
    C, R = _common(), _bench_module("render")
    results = tmp_path / "results"
    results.mkdir()
    (results / "throughput.json").write_text(json.dumps(_fixture_result(C)))
    (results / "gpu.json").write_text(
        json.dumps({**_fixture_result(C), "benchmark": "gpu", "figures": [], "skipped": "no GPU"})
    )
    docs = tmp_path / "benchmarks.md"
    head = "# B\n\nBetween `<!-- results:start -->` and `<!-- results:end -->`.\n\n"
    docs.write_text(f"{head}<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    readme = tmp_path / "README.md"
    readme.write_text("<!-- figures:start -->\n<!-- figures:end -->\n")
    assert not R.check(results, docs, readme)
    assert R.main(["--results", str(results), "--docs", str(docs), "--check"]) == 1
    assert R.main(["--results", str(results), "--docs", str(docs), "--readme", str(readme)]) == 0
    assert R.check(results, docs, readme)
    assert R.main(["--results", str(results), "--docs", str(docs), "--check"]) == 0

    text = docs.read_text()
    # Only the lines between the markers change (not where prose quotes them).
    assert text.startswith(f"{head}<!-- results:start -->\n") and text.endswith("end -->\ntail\n")
    assert "old" not in text
    # In rtrec bench's order: gpu before throughput.
    assert text.index("### gpu") < text.index("### throughput")
    assert "Skipped: no GPU." in text
    assert "| figure | value | baseline (same run) | ratio |" in text
    assert "| job, p1, id-only | 1,235 events/s | pass-through: 4,938 events/s | 0.25x |" in text
    assert "| job CPU per event | 812 us | - | - |" in text
    assert "`python benchmarks/throughput.py --events 5000`" in text
    assert "`0123456789`" in text and "Test CPU 9000, 4 CPUs, 16.0 GB, no GPU" in text
    assert "0.50/0.25/0.10 at start, 1.50/0.75/0.30 at end" in text
    assert "`job.bundle_size=5000`" in text

    head = readme.read_text()
    assert "| throughput | job, p1, id-only | 1,235 events/s | pass-through: 4,938 events/s" in head
    assert "job CPU per event" not in head  # only the headline figures
    # Each headline figure names the machine and the command that reproduces it; a skipped
    # benchmark has no headline figure.
    assert (
        "Test CPU 9000, 4 CPUs, no GPU | `python benchmarks/throughput.py --events 5000` |" in head
    )
    assert "| gpu |" not in head

    # A file without its markers is refused rather than overwritten.
    docs.write_text("no markers\n")
    assert R.main(["--results", str(results), "--docs", str(docs)]) == 2
    assert docs.read_text() == "no markers\n"


def test_docs_benchmarks_is_up_to_date_with_the_committed_results() -> None:
    R = _bench_module("render")
    assert R.check(), "docs/benchmarks.md is stale: run python benchmarks/render.py"
