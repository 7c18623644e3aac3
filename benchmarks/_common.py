"""Helpers shared by the benchmark scripts (not a test or library API).

Every script: ``python benchmarks/<name>.py [--quick] [--out DIR]`` prints its figures,
the ratio to a baseline measured in the same run, and writes ``<out>/<name>.json``:
the benchmark's name, the command line, the commit, the parameters and the job's
configuration, the machine (with its load average at start and end), and ``figures``,
one entry per figure with its baseline and ratio (see :func:`figure`), which
``benchmarks/render.py`` turns into the tables of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / ".rtrec" / "bench"
# Set by run_all.py (``rtrec bench``) for the scripts it starts: recorded as the command
# that ran them.
VIA_ENV = "RTREC_BENCH_VIA"


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# When the script started: with the figure at the end, how busy the machine was meanwhile.
_LOAD_AT_START = _loadavg()


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"benchmarks/{name}.py",
        description=(doc or "").strip().splitlines()[0] if doc else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small sizes (a smoke run; its figures are not results)",
    )
    p.add_argument("--out", default=str(DEFAULT_OUT), help="directory for <name>.json")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the job (e.g. job.bundle_size=5000), repeatable",
    )
    p.add_argument("--tag", default="", help="written as <name>-<tag>.json (variants of a run)")
    p.add_argument(
        "--config",
        action=_ConfigFile,
        dest="set",
        metavar="TOML",
        help="a config file's keys as overrides (e.g. flink_job/profiles/low-latency.toml)",
    )
    return p


class _ConfigFile(argparse.Action):
    """``--config F``: every key of TOML file F becomes a ``--set`` override, in place."""

    def __call__(self, parser, namespace, values, option_string=None):
        import tomllib

        with open(str(values), "rb") as fh:
            doc = tomllib.load(fh)
        sets = list(getattr(namespace, self.dest) or [])
        for section, keys in doc.items():
            for key, value in keys.items():
                sets.append(f"{section}.{key}={_toml_value(value)}")
        setattr(namespace, self.dest, sets)


def _toml_value(value: Any) -> str:
    """A TOML literal of a parsed TOML value (JSON's, except for tables)."""
    if isinstance(value, dict):
        pairs = (f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    return json.dumps(value)


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was (1/5/15-minute load
    averages when the script started and when it wrote its result: other processes on
    the same cores make the figures noisy)."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    cuda = torch.cuda.is_available()
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_gb": mem_gb,
        "loadavg_at_start": _LOAD_AT_START,
        "loadavg_at_end": _loadavg(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "cuda": torch.version.cuda if cuda else None,
        "os": f"{platform.system()} {platform.release()}",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyflink": _version("apache-flink"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def commit() -> dict[str, Any]:
    """The checkout the figures come from: ``sha`` (git rev-parse HEAD) and ``dirty``
    (tracked files differ from it; untracked ones are not counted); both None without
    git or outside a repository."""

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(
                ["git", "--no-optional-locks", *args],  # read-only: never writes the index
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout if proc.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if sha else None
    return {
        "sha": sha.strip() if sha else None,
        "dirty": bool(status.strip()) if status is not None else None,
    }


def _repo_relative(arg: str) -> str:
    """``arg`` with this checkout's absolute path (and the interpreter) made portable."""
    if arg == sys.executable:
        return "python"
    with contextlib.suppress(ValueError):
        p = Path(arg)
        if p.is_absolute():
            return str(p.resolve().relative_to(REPO))
    return arg


def command() -> dict[str, str | None]:
    """``argv``: this script's command line, run from the repository root; ``via``: the
    command that started it (``rtrec bench ...``), if any."""
    argv = [_repo_relative(a) for a in sys.argv]
    if argv and argv[0].endswith(".py"):
        argv.insert(0, "python")
    return {"argv": shlex.join(argv), "via": os.environ.get(VIA_ENV) or None}


def _plain(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return {k: _plain(v) for k, v in config.items()}
    return config


def figure(
    name: str,
    value: float | None,
    unit: str,
    baseline: str | None = None,
    baseline_value: float | None = None,
    ratio: float | None = None,
    headline: bool = False,
) -> dict[str, Any]:
    """One figure of a result: ``value`` in ``unit``, next to the ``baseline`` measured in
    the same run (what it is and its value, in the same unit) and ``ratio`` (value /
    baseline value unless given). ``headline``: the figure goes in the compact table of
    ``benchmarks/render.py --readme``."""
    if ratio is None:
        ratio = _quotient(value, baseline_value)
    return {
        "figure": name,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_value": baseline_value,
        "ratio": ratio,
        "headline": headline,
    }


def write_result(
    out_dir: str | Path,
    name: str,
    args: argparse.Namespace,
    result: dict,
    config: Any = None,
) -> Path:
    """``<out>/<name>.json``: what ran (benchmark, command, commit, parameters, the
    ``--set`` overrides and ``config``, the resolved configuration the run used: an
    AppConfig, other dataclasses or a dict of them), where (machine), when (utc), and
    ``result``, whose ``figures`` (a list of :func:`figure`) the renderer reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if getattr(args, "tag", ""):
        name = f"{name}-{args.tag}"
    doc = {
        "benchmark": name,
        "quick": bool(getattr(args, "quick", False)),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command(),
        "commit": commit(),
        "params": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "config": {
            "overrides": list(getattr(args, "set", None) or []),
            "resolved": _plain(config),
        },
        "machine": machine(),
        "figures": [],
        **result,
    }
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=str) + "\n")
    print(f"wrote {path}")
    return path


def table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A Markdown table of ``rows`` (floats to 3 significant-ish digits)."""
    if not rows:
        return "(no rows)"
    cols = columns or list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            if v != v:
                return "nan"
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)) + " |"
        for row in cells
    ]
    return "\n".join([line, sep, *body])


def percentiles(xs: list[float], ps: tuple[int, ...] = (50, 95, 99)) -> dict[str, float | None]:
    """Nearest-rank percentiles (None for an empty list)."""
    s = sorted(xs)
    out: dict[str, float | None] = {}
    for p in ps:
        if not s:
            out[f"p{p}"] = None
            continue
        k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))  # nearest rank
        out[f"p{p}"] = s[k]
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b; None when either is missing or b is 0."""
    return _quotient(a, b)


def _quotient(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- CPU accounting
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_table() -> dict[tuple[int, int], tuple[int, str, float]]:
    """(pid, start time) -> (parent pid, command line, CPU seconds so far) of every process
    this user can read in /proc. The start time tells a reused pid from the process before."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or not ours to read
            continue
        # Fields after the command name, which is in parentheses and may hold spaces:
        # state(0) ppid(1) ... utime(11) stime(12) ... starttime(19).
        f = stat.rsplit(")", 1)[1].split()
        cpu = (int(f[11]) + int(f[12])) / _CLK_TCK
        table[(int(entry), int(f[19]))] = (int(f[1]), cmd, cpu)
    return table


def run_queue_s(pid: int) -> float:
    """Seconds the threads of process ``pid`` have spent runnable but waiting for a CPU
    (the scheduler's run_delay in /proc/PID/task/TID/schedstat), summed over the threads
    alive now; 0.0 when unreadable. A thread that has exited drops out of the sum."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    total = 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return total / 1e9


def cpu_kind(cmd: str) -> str:
    """What a process of a benchmark run is, from its command line."""
    exe = cmd.split(" ", 1)[0]
    if exe.endswith("java"):
        return "kafka" if " kafka.Kafka " in f"{cmd} " else "flink_jvm"
    if "pyflink.fn_execution" in cmd:
        return "python_worker"
    return "other"


class ProcessCPU(threading.Thread):
    """CPU seconds that this process and its descendants (the local Flink JVM, its Python
    workers, the embedded Kafka broker) use between start() and result(), per process kind:
    where a run's CPU goes, measured rather than assumed.

    Linux only (/proc); elsewhere result() is None. Polled every ``interval_s``: a process
    that ends between two polls is counted up to the last poll that saw it. A process that
    existed at start() counts only what it used after that. Every poll is kept, so that
    :meth:`rate` and :meth:`cores` can give the cores in use in a window of the run (the
    steady state, without start-up).
    """

    def __init__(self, interval_s: float = 0.5) -> None:
        super().__init__(name="rtrec-bench-cpu", daemon=True)
        self.interval_s = interval_s
        self.available = os.path.isfile("/proc/self/stat")
        self._stop_event = threading.Event()
        self._base: dict[tuple[int, int], float] = {}
        self._seen: dict[tuple[int, int], tuple[str, float]] = {}
        self._root = os.getpid()
        self._self_t0 = 0.0
        # (time.time(), {process key: CPU-s so far}), "client" = this process.
        self._per_process: list[tuple[float, dict[Any, float]]] = []
        # (time.time(), {process key: run-queue seconds so far}).
        self._run_queue: list[tuple[float, dict[Any, float]]] = []
        self._waited: dict[tuple[int, int], float] = {}

    def start(self) -> None:
        if self.available:
            self._base = {k: v[2] for k, v in _proc_table().items()}
        t = os.times()
        self._self_t0 = t.user + t.system
        super().start()

    def _poll(self) -> None:
        table = _proc_table()
        parents = {pid: ppid for (pid, _), (ppid, _, _) in table.items()}
        for key, (_, cmd, cpu) in table.items():
            pid, hops = key[0], 0
            while pid not in (self._root, 0, 1) and pid in parents and hops < 64:
                pid, hops = parents[pid], hops + 1
            if pid == self._root and key[0] != self._root:
                # An exited process not reaped yet (a zombie) has an empty command line.
                cmd = cmd or self._seen.get(key, ("", 0.0))[0]
                self._seen[key] = (cmd, cpu - self._base.get(key, 0.0))
        t = os.times()
        own = t.user + t.system - self._self_t0
        now = time.time()
        self._per_process.append(
            (now, {"client": own, **{k: c for k, (_, c) in self._seen.items()}})
        )
        # The largest figure seen per process: an exited process keeps it, as for CPU, and
        # so does one whose threads that had waited have exited since (they drop out of
        # the sum, which would otherwise shrink).
        for k in self._seen:
            if k in table:
                self._waited[k] = max(self._waited.get(k, 0.0), run_queue_s(k[0]))
        self._run_queue.append((now, {"client": run_queue_s(self._root), **self._waited}))

    def run(self) -> None:
        while self.available and not self._stop_event.is_set():
            self._poll()
            self._stop_event.wait(self.interval_s)

    def _by_kind(
        self, cpu: dict[Any, float], rank: dict[Any, float] | None = None
    ) -> dict[str, Any]:
        """{process key: figure} -> {"client", "flink_jvm", "kafka", "other": sum,
        "python_workers": [one figure per worker, largest first, or in the order of the
        workers' ``rank`` figures, largest first]}."""
        out: dict[str, Any] = {"client": 0.0, "flink_jvm": 0.0, "kafka": 0.0, "other": 0.0}
        workers = []
        for key, c in cpu.items():
            kind = "client" if key == "client" else cpu_kind(self._seen[key][0])
            if kind == "python_worker":
                workers.append(((rank or cpu).get(key, 0.0), c))
            else:
                out[kind] += c
        out["python_workers"] = [c for _, c in sorted(workers, reverse=True)]
        return out

    def _window(
        self, t0: float, t1: float, record: list[tuple[float, dict[Any, float]]] | None = None
    ) -> dict[Any, float] | None:
        """Per process, the growth per second of a cumulative figure (CPU seconds by
        default) between the first and last poll inside wall times ``t0``..``t1``
        (time.time()); None without /proc or with fewer than two polls."""
        polls = self._per_process if record is None else record
        inside = [(t, c) for t, c in polls if t0 <= t <= t1]
        if not self.available or len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        (ta, ca), (tb, cb) = inside[0], inside[-1]
        return {k: (c - ca.get(k, 0.0)) / (tb - ta) for k, c in cb.items()}

    def _rounded_by_kind(
        self, w: dict[Any, float] | None, rank: dict[Any, float] | None = None
    ) -> dict[str, Any] | None:
        if w is None:
            return None
        return {
            k: ([round(x, 2) for x in v] if isinstance(v, list) else round(v, 2))
            for k, v in self._by_kind(w, rank).items()
        }

    def rate(self, t0: float, t1: float) -> float | None:
        """Cores in use (CPU seconds per second) by the whole run in a window (see
        :meth:`cores`)."""
        w = self._window(t0, t1)
        return sum(w.values()) if w is not None else None

    def cores(self, t0: float, t1: float) -> dict[str, Any] | None:
        """Cores in use per process kind between wall times ``t0`` and ``t1``, from the
        first and last poll inside that window: {"client", "flink_jvm", "kafka", "other":
        cores, "python_workers": [cores of each worker, busiest first]}. A single process
        near 1.0 (one core; a Python worker is one GIL) is the stage that limits the run."""
        return self._rounded_by_kind(self._window(t0, t1))

    def waiting(self, t0: float, t1: float) -> dict[str, Any] | None:
        """Like :meth:`cores`, the threads of each kind that were runnable but waiting for
        a CPU (Linux run queue), on average, between wall times ``t0`` and ``t1``: CPU
        contention. A stage that waits a lot is slowed by the others, not by its own work.
        The Python workers are listed in the order of :meth:`cores` (busiest first), so
        that the two lists line up."""
        cores = self._window(t0, t1)
        return self._rounded_by_kind(self._window(t0, t1, self._run_queue), cores)

    def result(self) -> dict[str, Any] | None:
        """{"client_s", "flink_jvm_s", "kafka_s", "other_s", "python_workers_s" (one
        figure per worker process, largest first), "total_s"}; None without /proc."""
        self._stop_event.set()
        self.join()
        if not self.available:
            return None
        self._poll()
        _, latest = self._per_process[-1]
        out = {f"{k}_s": v for k, v in self._by_kind(latest).items()}
        out["total_s"] = sum(latest.values())
        return {
            k: ([round(x, 2) for x in v] if isinstance(v, list) else round(v, 2))
            for k, v in out.items()
        }


def cpu_line(cpu: dict[str, Any] | None, events: int) -> str:
    """One log line: a run's CPU seconds per process kind and per event."""
    if cpu is None:
        return "CPU accounting needs /proc (Linux)"
    workers = " + ".join(f"{w:.1f}" for w in cpu["python_workers_s"]) or "none"
    per_event = cpu["total_s"] * 1e6 / events if events else float("nan")
    return (
        f"CPU: Flink JVM {cpu['flink_jvm_s']:.1f} s, Python workers {workers} s, "
        f"Kafka {cpu['kafka_s']:.1f} s, client {cpu['client_s']:.1f} s, other "
        f"{cpu['other_s']:.1f} s = {cpu['total_s']:.1f} CPU-s, {per_event:,.0f} us/event "
        "(start-up included)"
    )


# --------------------------------------------------------------------------- Kafka + registry


@contextlib.contextmanager
def embedded_kafka(workdir: Path) -> Iterator[str]:
    from infra.kafka import EmbeddedKafka

    with EmbeddedKafka(workdir / "kafka") as k:
        yield k.bootstrap


def config(overrides: list[str]):
    from flink_job.config import load_config

    return load_config(None, overrides)


def all_topics(cfg) -> list[str]:
    """Every topic the configuration names (events, items, dlq, models, ...)."""
    import dataclasses

    k = cfg.kafka
    names = [getattr(k, f.name) for f in dataclasses.fields(k) if f.name.endswith("_topic")]
    return [n for n in names if n]


def create_all_topics(cfg, bootstrap: str) -> None:
    from infra.kafka import create_topics

    create_topics(bootstrap, all_topics(cfg), cfg.kafka.partitions, cfg.kafka.properties)


def topic_overrides(prefix: str) -> list[str]:
    return [
        f"kafka.events_topic='{prefix}.events'",
        f"kafka.items_topic='{prefix}.items'",
        f"kafka.dlq_topic='{prefix}.dlq'",
        f"kafka.models_topic='{prefix}.models'",
    ]


class RegistryWatcher(threading.Thread):
    """Polls a registry directory; records (wall time first seen, manifest) per version."""

    def __init__(self, root: Path, model_key: str = "default", every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.root, self.key, self.every_s = Path(root), model_key, every_s
        self.seen: dict[str, tuple[float, dict]] = {}
        self.stop_flag = threading.Event()

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.poll()
            time.sleep(self.every_s)

    def poll(self) -> None:
        d = self.root / self.key
        if not d.is_dir():
            return
        for p in d.iterdir():
            if p.name.startswith("v") and p.name not in self.seen and p.is_dir():
                with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                    m = json.loads((p / "manifest.json").read_text())
                    self.seen[p.name] = (time.time(), m)

    def versions(self) -> list[tuple[float, dict]]:
        """(seen wall time, manifest), by version number."""
        return sorted(self.seen.values(), key=lambda x: x[1]["version"])

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(5)


def manifests_by_mtime(root: Path, model_key: str = "default") -> list[tuple[float, dict]]:
    """(manifest.json mtime = publish wall time, manifest) of every version, by version."""
    d = Path(root) / model_key
    out = []
    if d.is_dir():
        for p in d.iterdir():
            f = p / "manifest.json"
            if p.name.startswith("v") and f.is_file():
                out.append((f.stat().st_mtime, json.loads(f.read_text())))
    return sorted(out, key=lambda x: x[1]["version"])


class ModelsTopicWatcher(threading.Thread):
    """A read_committed consumer of the ``models`` topic: (wall time received, manifest)."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.seen: list[tuple[float, dict]] = []
        self.stop_flag = threading.Event()
        self.ready = threading.Event()

    def run(self) -> None:
        from kafka import KafkaConsumer

        from infra.kafka import MAX_MESSAGE_BYTES

        c = KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            fetch_max_bytes=MAX_MESSAGE_BYTES * 2,
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES * 2,
        )
        self.ready.set()
        try:
            while not self.stop_flag.is_set():
                for recs in c.poll(timeout_ms=100).values():
                    now = time.time()
                    for r in recs:
                        with contextlib.suppress(ValueError, KeyError):
                            self.seen.append((now, json.loads(r.value)["manifest"]))
        finally:
            c.close()

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(10)


class LiveProducer(threading.Thread):
    """Produces the synthetic stream at ``rate`` events/s with event time = wall clock.

    The catalogue goes first (ts = now); each event's ``ts`` and record timestamp are set
    to the produce wall time, which is kept in ``produced`` as (ts_ms, wall_s).
    """

    def __init__(self, cfg, bootstrap: str, rate: float, limit_s: float) -> None:
        super().__init__(daemon=True)
        self.cfg, self.bootstrap, self.rate, self.limit_s = cfg, bootstrap, rate, limit_s
        self.produced: list[tuple[int, float]] = []
        self.stop_flag = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:  # reported by the caller
            self.error = e

    def _run(self) -> None:
        from kafka import KafkaProducer

        from infra.kafka import MAX_MESSAGE_BYTES
        from replay.datasets import records

        k = self.cfg.kafka
        create_all_topics(self.cfg, self.bootstrap)
        producer = KafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks="all",
            linger_ms=0,
            max_request_size=MAX_MESSAGE_BYTES,
        )
        topic_of = {"events": k.events_topic, "items": k.items_topic}
        t0 = time.monotonic()
        n = 0
        try:
            for rec in records(self.cfg.replay):
                if self.stop_flag.is_set() or time.monotonic() - t0 > self.limit_s:
                    break
                if not rec.valid:
                    continue
                body = json.loads(rec.value)
                wall = time.time()
                ts = int(wall * 1000)
                body["ts"] = ts
                producer.send(
                    topic_of[rec.topic],
                    key=rec.key,
                    value=json.dumps(body, separators=(",", ":")).encode(),
                    timestamp_ms=ts,
                )
                if rec.topic != "events":
                    continue
                self.produced.append((ts, wall))
                n += 1
                ahead = n / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            producer.flush(timeout=60)
        finally:
            producer.close(timeout=10)

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(30)


def standalone_cluster(workdir: Path, taskmanagers: int, slots: int):
    """``infra.cluster.StandaloneCluster`` with a fresher REST view of the job.

    The JobManager caches the execution graph it serves over REST for
    ``web.refresh-interval`` (3 s by default); benchmarks poll it, so it is 200 ms here.
    """
    from infra.cluster import StandaloneCluster

    class BenchCluster(StandaloneCluster):
        def _conf(self) -> dict[str, str]:
            return {**super()._conf(), "web.refresh-interval": "200"}

    return BenchCluster(workdir, taskmanagers=taskmanagers, slots=slots)


def rest_json(address: str, path: str, timeout: float = 5.0) -> Any:
    import urllib.request

    with urllib.request.urlopen(f"http://{address}{path}", timeout=timeout) as r:
        return json.loads(r.read())


def submit_to_cluster(address: str, bootstrap: str, overrides: list[str]) -> str:
    """`rtrec submit` to a standalone cluster; returns the new job id."""
    import subprocess

    before = {j["jid"] for j in rest_json(address, "/jobs/overview")["jobs"]}
    env = {k: v for k, v in os.environ.items() if "PYFLINK" not in k}
    cmd = [sys.executable, "-m", "rtrec.cli", "submit", "--jobmanager", address]
    cmd += ["--bootstrap", bootstrap, *[x for o in overrides for x in ("--set", o)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"submit failed: {proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    new = [j["jid"] for j in rest_json(address, "/jobs/overview")["jobs"] if j["jid"] not in before]
    if len(new) != 1:
        raise RuntimeError(f"expected one new job on {address}, found {new}")
    return new[0]


def cancel_job(address: str, jid: str) -> None:
    """Best effort (benchmark clean-up): cancel and wait, never raise."""
    from flink_job.savepoints import SavepointError
    from flink_job.savepoints import cancel_job as cancel

    with contextlib.suppress(SavepointError):
        cancel(address, jid)
