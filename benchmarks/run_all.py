"""Run every benchmark (each in its own process), then print a summary table.

``rtrec bench [--quick] [--only a,b] [--out DIR]`` and ``make bench`` call this; each
script also runs on its own (``python benchmarks/<name>.py --help``). ``gpu`` runs with
``--skip-without-gpu``: on a machine without a GPU it is reported as skipped. Results go
to ``<out>/<name>.json``; ``--out benchmarks/results`` for the committed ones, which
``python benchmarks/render.py`` turns into the tables of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import _common as C

CONFIGS = Path(__file__).resolve().parents[1] / "flink_job" / "profiles"
# Cheapest first, so a broken environment fails fast.
BENCHMARKS = [
    "catalogue",
    "serving",
    "poisoning",
    "quality",
    "gpu",
    "throughput",
    "freshness",
    "throughput-high-throughput",
    "freshness-low-latency",
    "recovery",
    "state",
]
# Variants: another script's run with extra arguments (written as <script>-<tag>.json).
VARIANTS = {
    "throughput-high-throughput": [
        "throughput",
        "--config",
        str(CONFIGS / "high-throughput.toml"),
        "--tag",
        "high-throughput",
    ],
    "freshness-low-latency": [
        "freshness",
        "--config",
        str(CONFIGS / "low-latency.toml"),
        "--tag",
        "low-latency",
    ],
    # A CPU-only machine has no accelerator to compare with the CPU: skipped, not failed.
    "gpu": ["gpu", "--skip-without-gpu"],
}
HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rtrec bench", description=__doc__.strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run of each")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--out", default=str(C.DEFAULT_OUT), help="directory for <name>.json")
    args, extra = p.parse_known_args(argv)
    args.out = str(Path(args.out).resolve())  # the scripts run with the repository as cwd
    names = [n for n in args.only.split(",") if n] or BENCHMARKS
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    status: dict[str, tuple[int, float]] = {}
    # Recorded in each result as the command that ran the script.
    via = shlex.join(["rtrec", "bench", *(C._repo_relative(a) for a in (argv or sys.argv[1:]))])
    env = {**os.environ, C.VIA_ENV: via}
    for name in names:
        script, *variant = VARIANTS.get(name, [name])
        cmd = [sys.executable, str(HERE / f"{script}.py"), "--out", args.out, *variant]
        cmd += ["--quick"] if args.quick else []
        cmd += extra if len(names) == 1 else []  # extra flags only make sense for one script
        C.log(f"=== {name}: {' '.join(cmd[1:])}")
        t0 = time.monotonic()
        rc = subprocess.call(cmd, cwd=C.REPO, env=env)
        status[name] = (rc, time.monotonic() - t0)
        if rc:
            C.log(f"=== {name} failed (exit {rc})")
    rows = []
    for name in names:
        rc, secs = status[name]
        path = Path(args.out) / f"{name}.json"
        headline, result = "-", "ok" if rc == 0 else f"FAILED ({rc})"
        if rc == 0 and path.is_file():
            doc = json.loads(path.read_text())
            headline = doc.get("headline", "-")
            result = "skipped" if doc.get("skipped") else result
        rows.append({
            "benchmark": name,
            "result": result,
            "wall_s": secs,
            "headline (vs baseline of the same run)": headline,
        })  # fmt: skip
    m = C.machine()
    print()
    print(
        f"rtrec bench{' --quick' if args.quick else ''}: {m['cpu']}, {m['cpus']} CPUs, "
        f"{m['mem_gb']} GB, GPU {m['gpu'] or 'none'}; JSON in {args.out}"
    )
    print(C.table(rows))
    return 0 if all(rc == 0 for rc, _ in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
