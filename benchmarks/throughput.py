"""Throughput: sustained events/s from Kafka through the whole job, checkpointing on.

Setup: the embedded Kafka broker, the synthetic dataset replayed once into ``bench.events``
(+ its catalogue into ``bench.items``, with the replay's share of malformed records,
``replay.malformed_fraction``, so that validation and the DLQ work); every run reads it
from the beginning as a bounded source.

- job: the real job (``build_job`` via ``run_local`` on a local mini-cluster: parse +
  validate + DLQ, user windows, trainer, registry + transactional ``models`` topic),
  checkpoints every ``--checkpoint-ms`` (10 s). Steady state = between the end of the
  trainer's first firing and the end of its last one, from its own counters:
  (events_seen(last) - events_seen(first)) / (wall(last) - wall(first)), logged by a
  subclass of the job's trainer that the benchmark swaps in (the graph is unchanged).
  JVM, Python-worker and model start-up come before the first firing and are excluded.
  With a text encoder the window includes embedding the catalogue's text as its records
  arrive (spread over the run), which compute-only does before its timed window.
- baseline pass-through: the same Kafka source builder (``flink_job.job._kafka_bytes``),
  then key_by(record hash ~ user) -> keyed ValueState counter -> key_by(model key) ->
  keyed ValueState counter, all no-op Python functions, same parallelism and
  checkpointing; rate between the first and the last record reaching the last stage.
- baseline upstream (the job without its learner): the same job and graph, whose trainer
  drains its buffer and counts the samples but learns nothing (no learner call, no model
  state written, no versions; a subclass swapped in like the timed one): the ceiling of
  everything before the learner - Kafka, validation, user windows (and the catalogue's
  embedding), the shuffle to the trainer and its buffer state. job / upstream says how
  much the learner costs; upstream / pass-through, how far the job's own stages are
  from no-op ones.
- baseline compute-only: the trainer's learn loop alone (``train_and_maybe_export`` on
  the same samples, same step size (below) and export cadence, catalogue ingested in order,
  through ``offline.stream``), no Flink; samples/s of the whole loop. Batches of
  ``catchup_factor x batch_size``: the replay is a backlog, which the job learns in catch-up
  steps (``models.online.step_due``).

- CPU: each Flink run's CPU seconds per process (Flink JVM, every Python worker, Kafka
  broker, client; ``benchmarks/_common.ProcessCPU``, from /proc) and per event, with
  start-up and in the steady-state window (JSON; the table shows the steady figures), and
  compute-only's own CPU per sample. Where an event's CPU goes, measured.

Printed per (parallelism, text encoder): job events/s, job/pass-through, job/compute-only,
and CPU us per event of the job, the pass-through and compute-only. The trainer's
per-second timeline of each job and upstream run (events learned, or counted, in each
second from its first firing; ``timeline`` in the JSON, the seconds with none as
``stalled_s``) is plotted next to the JSON (``throughput[-TAG].png``): the stages of a
catch-up run take turns, so the steady rate is an average of bursts and pauses.
"""

from __future__ import annotations

import itertools
import json
import os
import pickle
import shutil
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import _common as C


# ----------------------------------------------------------------- the pass-through job
def _passthrough_functions():
    """Defined lazily: importing pyflink costs seconds and only the Flink runs need it."""
    from pyflink.common import Types
    from pyflink.datastream import KeyedProcessFunction, MapFunction
    from pyflink.datastream.state import ValueStateDescriptor

    class HashKey(MapFunction):
        def map(self, value):
            return str(zlib.crc32(bytes(value)) & 1023), 1

    class CountPerKey(KeyedProcessFunction):
        def __init__(self, out_key: str | None = None, record_dir: str | None = None):
            self.out_key = out_key
            self.record_dir = record_dir

        def open(self, runtime_context):
            self.count = runtime_context.get_state(ValueStateDescriptor("n", Types.LONG()))
            self.first = self.last = None
            self.n = 0
            self.task = runtime_context.get_index_of_this_subtask()

        def process_element(self, value, ctx):
            self.count.update((self.count.value() or 0) + value[1])
            if self.record_dir is None:
                yield self.out_key, 1
                return
            now = time.time()
            if self.first is None:
                self.first = now
            self.last = now
            self.n += 1
            if self.n % 500 == 0:
                self._write()

        def _write(self):
            if self.record_dir is not None and self.n:
                p = Path(self.record_dir) / f"stage-{self.task}.json"
                p.write_text(json.dumps({"first": self.first, "last": self.last, "n": self.n}))

        def close(self):
            self._write()

    return Types, HashKey, CountPerKey


def run_passthrough(cfg, bootstrap: str, record_dir: Path, timeout_s: float) -> dict[str, Any]:
    from flink_job.job import TRAINER_PARALLELISM, _kafka_bytes, make_env
    from flink_job.operators import key_by_field

    Types, HashKey, CountPerKey = _passthrough_functions()
    record_dir.mkdir(parents=True, exist_ok=True)
    env = make_env(cfg)
    raw = _kafka_bytes(env, cfg, bootstrap, cfg.kafka.events_topic)
    pair = Types.TUPLE([Types.STRING(), Types.LONG()])
    # Keyed as the job keys (in the JVM, flink_job.operators.key_by_field).
    hashed = raw.map(HashKey(), output_type=pair)
    counted = key_by_field(hashed, 0).process(
        CountPerKey(out_key=cfg.job.model_key), output_type=pair
    )
    # At the trainer's parallelism (flink_job.job.TRAINER_PARALLELISM), as in the job.
    key_by_field(counted, 0).process(
        CountPerKey(record_dir=str(record_dir)), output_type=pair
    ).set_parallelism(TRAINER_PARALLELISM).print().set_parallelism(TRAINER_PARALLELISM)
    cpu = C.ProcessCPU()
    cpu.start()
    t0 = time.monotonic()
    client = env.execute_async("rtrec-bench-passthrough")
    done = threading.Thread(target=lambda: client.get_job_execution_result().result(), daemon=True)
    done.start()  # bounded: ends with the input
    done.join(timeout_s)
    if done.is_alive():
        client.cancel().result()
        raise TimeoutError(f"pass-through job did not finish within {timeout_s:.0f}s; cancelled")
    elapsed = time.monotonic() - t0
    cpu_s = cpu.result()
    stages = [json.loads(p.read_text()) for p in record_dir.glob("stage-*.json")]
    n = sum(s["n"] for s in stages)
    C.log(C.cpu_line(cpu_s, n))
    first = min(s["first"] for s in stages)
    last = max(s["last"] for s in stages)
    events_per_s = (n - 1) / (last - first) if last > first else None
    return {
        "records": n,
        "steady_s": last - first,
        "events_per_s": events_per_s,
        "elapsed_s": elapsed,
        "cpu": cpu_s,
        **_steady_cpu(cpu, first, last, events_per_s),
    }


# -------------------------------------------------------------------------- the real job
def timed_trainer(log_dir: str, learn: bool = True):
    """The job's OnlineTrainer, logging (wall time, events_seen) after every firing; with
    ``learn`` False, one that counts its samples instead of learning from them (the
    upstream baseline).

    A registry version's publish time lags the trainer by up to a Python bundle (the
    first version leaves the trainer with the bundle it was made in), so the trainer's
    own clock is used. The job graph itself is unchanged: ``flink_job.job`` is given this
    subclass for the duration of the run (a benchmark-side hook; no change to the job).
    """
    from udfs.trainer import OnlineTrainer

    class TimedTrainer(OnlineTrainer):
        def _fire(self, key, *args, **kwargs):
            yield from super()._fire(key, *args, **kwargs)
            self._log(key)

        def _log(self, key):
            seen = self._meta(key)["events_seen"]
            with open(Path(log_dir) / f"trainer-{os.getpid()}.log", "a") as fh:
                fh.write(f"{time.time()} {seen}\n")
            threads = Path(log_dir) / "torch-threads"
            if not threads.exists():
                import torch

                threads.write_text(str(torch.get_num_threads()))

    class CountingTrainer(TimedTrainer):
        def _fire(self, key, watermark, samples=None, final=False):
            # The buffer is drained (its rows decoded) as a firing would; nothing learns.
            rows = self.buffer.drain(key) if samples is None else samples
            meta = self._meta(key)
            meta["events_seen"] += len(rows)
            self.meta.update(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
            self._log(key)
            return iter(())

    return TimedTrainer if learn else CountingTrainer


def run_job(
    cfg, bootstrap: str, timeout_s: float, log_dir: Path, learn: bool = True
) -> dict[str, Any]:
    """The job on the replayed topic (``learn`` False: the upstream baseline)."""
    import flink_job.job as job
    from flink_job.runner import run_local

    log_dir.mkdir(parents=True, exist_ok=True)
    original = job.OnlineTrainer
    job.OnlineTrainer = timed_trainer(str(log_dir), learn)
    cpu = C.ProcessCPU()
    cpu.start()
    try:
        res = run_local(cfg, bootstrap, progress_every_s=10.0, timeout_s=timeout_s)
    finally:
        job.OnlineTrainer = original
        cpu_s = cpu.result()
    if res.status != "FINISHED":
        raise RuntimeError(f"job ended {res.status}")
    versions = C.manifests_by_mtime(Path(cfg.export.registry_dir), cfg.job.model_key)
    firings = sorted(
        (float(t), int(n))
        for f in log_dir.glob("trainer-*.log")
        for t, n in (line.split() for line in f.read_text().splitlines() if line.strip())
    )
    # From the end of the first firing that learned something to the end of the last one.
    firings = [f for f in firings if f[1] > 0]
    if len(firings) < 2:
        raise RuntimeError(f"{len(firings)} trainer firing(s): too few events to measure")
    (t_a, n_a), (t_b, n_b) = firings[0], max(firings, key=lambda f: (f[1], -f[0]))
    threads = log_dir / "torch-threads"
    C.log(C.cpu_line(cpu_s, n_b))
    events_per_s = (n_b - n_a) / (t_b - t_a)
    timeline = learning_timeline([f for f in firings if f[0] <= t_b])
    stalled = sum(1 for _, rate in timeline if rate == 0)
    steady = _steady_cpu(cpu, t_a, t_b, events_per_s)
    C.log(f"trainer timeline: nothing learned in {stalled} of {len(timeline)} seconds")
    C.log(f"steady state: cores in use {steady['steady_cores_by_process']}")
    C.log(f"steady state: threads waiting for a CPU {steady['steady_waiting_for_cpu_by_process']}")
    return {
        "trainer_torch_threads": int(threads.read_text()) if threads.exists() else None,
        "events_seen": n_b,
        "versions": len(versions),
        "firings": len(firings),
        "steady_s": t_b - t_a,
        "events_per_s": events_per_s,
        "elapsed_s": res.elapsed_s,
        "first_version_s": res.first_version_s,
        "overall_events_per_s": n_b / res.elapsed_s,
        "timeline": timeline,
        "stalled_s": stalled,
        "cpu": cpu_s,
        **steady,
    }


# ------------------------------------------------------------------------- compute only
def run_compute_only(cfg, threads: int | None) -> dict[str, Any]:
    import torch

    from models.online import largest_step, train_and_maybe_export
    from models.text_encoder import load_configured_encoder
    from models.trainer import OnlineLearner, new_meta
    from offline.stream import batches, to_stream
    from replay.datasets import records

    if threads:  # as many intra-op threads as the job's trainer worker had
        torch.set_num_threads(threads)
    encoder = load_configured_encoder(cfg.model, cfg.trainer.deterministic)
    stream = list(to_stream(records(cfg.replay), cfg))  # parse + user stage, not timed
    learner = OnlineLearner(cfg.model, cfg.trainer, text_dim=encoder.dim if encoder else 0)
    meta = new_meta(cfg.job.model_key)
    n = versions = 0
    c0 = os.times()
    t0 = time.perf_counter()
    first: tuple[float, int] | None = None  # (time, samples) at the end of the first firing
    # The whole stream is a backlog, which the job's trainer learns in catch-up steps
    # (models.online.step_due): the ceiling is the loop at that step size.
    for items, samples in batches(stream, largest_step(cfg.trainer)):
        f = train_and_maybe_export(
            learner, meta, samples, lambda: None, lambda: (), cfg.export.top_k, {},
            new_items=items, encoder=encoder,
        )  # fmt: skip
        n += len(samples)
        versions += f.version is not None
        if first is None and f.version is not None:
            first = (time.perf_counter(), n)
    f = train_and_maybe_export(
        learner, meta, [], lambda: None, lambda: (), cfg.export.top_k, {}, force_export=True
    )
    versions += f.version is not None
    end = time.perf_counter()
    c1 = os.times()
    # Same definition as the job's: from the first published version to the last one
    # (the first firing's one-off costs - allocations, first catalogue - are excluded).
    t_a, n_a = first or (t0, 0)
    return {
        "samples": n,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "elapsed_s": end - t0,
        "events_per_s": (n - n_a) / (end - t_a),
        "overall_events_per_s": n / (end - t0),
        "cpu_us_per_sample": (c1.user + c1.system - c0.user - c0.system) * 1e6 / max(n, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = C.parser("throughput", __doc__)
    # Enough events for a steady window of tens of seconds that is not dominated by the
    # catalogue's embedding at the start: a short window makes the figure vary run to run.
    p.add_argument("--events", type=int, default=120_000, help="events replayed")
    p.add_argument("--users", type=int, default=2_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--parallelism", default="1,2", help="job parallelism values")
    p.add_argument(
        "--encoders",
        default="minilm,none",
        help="model.text_encoder values: minilm (default config) and/or none (id-only)",
    )
    p.add_argument("--checkpoint-ms", type=int, default=10_000)
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="torch threads of the compute-only loop (0 = as the job's trainer worker)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per Flink run")
    p.add_argument("--workdir", default="", help="scratch directory (default: a temp dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.users, args.items = 2000, 300, 400
        args.parallelism, args.encoders = "1", "none"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rtrec-bench-throughput-"))
    rows: list[dict[str, Any]] = []
    from replay.producer import replay

    base = [
        *C.topic_overrides("bench"),
        "kafka.bounded=true",
        f"replay.num_events={args.events}",
        f"replay.num_users={args.users}",
        f"replay.num_items={args.items}",
        f"replay.new_items_midstream={min(40, args.items // 10)}",
        f"job.checkpoint_interval_ms={args.checkpoint_ms}",
        "job.retain_checkpoints=false",
        *args.set,
    ]
    try:
        with C.embedded_kafka(work) as bootstrap:
            t0 = time.monotonic()
            C.create_all_topics(C.config(base), bootstrap)
            stats = replay(C.config(base), bootstrap, progress=False)
            C.log(
                f"replayed {stats.events} events + {stats.items} items "
                f"in {time.monotonic() - t0:.1f}s"
            )
            for enc in args.encoders.split(","):
                cfg0 = C.config([*base, f"model.text_encoder='{enc}'"])
                enc_rows = []
                for par in [int(x) for x in args.parallelism.split(",")]:
                    tag = f"p{par}-{enc}"
                    cfg, up_cfg = (
                        C.config([
                            *base,
                            f"model.text_encoder='{enc}'",
                            f"job.parallelism={par}",
                            f"export.registry_dir='{work / tag / run / 'registry'}'",
                            f"job.checkpoint_dir='{work / tag / run / 'checkpoints'}'",
                            f"kafka.group_id='bench-{tag}-{run}'",
                        ])
                        for run in ("job", "upstream")
                    )  # fmt: skip
                    C.log(f"pass-through ({tag})")
                    pt = run_passthrough(cfg, bootstrap, work / tag / "passthrough", args.timeout)
                    C.log(f"upstream: the job without its learner ({tag})")
                    up = run_job(
                        up_cfg, bootstrap, args.timeout, work / tag / "upstream-log", learn=False
                    )
                    C.log(f"job ({tag})")
                    job = run_job(cfg, bootstrap, args.timeout, work / tag / "trainer-log")
                    enc_rows.append((par, pt, up, job))
                # Same intra-op thread count as the job's trainer (a Python worker process):
                # on a busy machine the loop's speed depends strongly on it.
                threads = args.torch_threads or enc_rows[0][3]["trainer_torch_threads"]
                C.log(f"compute-only ({enc}, {threads} torch thread(s)): without Flink")
                comp = run_compute_only(cfg0, threads)
                for par, pt, up, job in enc_rows:
                    rows.append({
                        "parallelism": par,
                        "encoder": enc,
                        "job_events_per_s": job["events_per_s"],
                        "passthrough_events_per_s": pt["events_per_s"],
                        "upstream_events_per_s": up["events_per_s"],
                        "compute_only_events_per_s": comp["events_per_s"],
                        "job_vs_passthrough": C.ratio(job["events_per_s"], pt["events_per_s"]),
                        "job_vs_upstream": C.ratio(job["events_per_s"], up["events_per_s"]),
                        "upstream_vs_passthrough": C.ratio(
                            up["events_per_s"], pt["events_per_s"]
                        ),
                        "job_vs_compute_only": C.ratio(job["events_per_s"], comp["events_per_s"]),
                        "job_cpu_us_per_event": _per_event(job["cpu"], job["events_seen"]),
                        "job_steady_cpu_us_per_event": job["steady_cpu_us_per_event"],
                        "passthrough_cpu_us_per_event": _per_event(pt["cpu"], pt["records"]),
                        "passthrough_steady_cpu_us_per_event": pt["steady_cpu_us_per_event"],
                        "compute_only_cpu_us_per_sample": comp["cpu_us_per_sample"],
                        "job_steady_s": job["steady_s"],
                        "job_versions": job["versions"],
                        "job_first_version_s": job["first_version_s"],
                        "job_overall_events_per_s": job["overall_events_per_s"],
                        "job": job,
                        "passthrough": pt,
                        "upstream": up,
                        "compute_only": comp,
                    })  # fmt: skip
                    print(C.table(rows[-1:], _COLS), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(C.table(rows, _COLS))
    best = max(rows, key=lambda r: r["job_events_per_s"])
    headline = (
        f"job {best['job_events_per_s']:.0f} events/s (p{best['parallelism']}, {best['encoder']}): "
        f"{best['job_vs_passthrough']:.2f}x pass-through, "
        f"{best['job_vs_upstream']:.2f}x the job without its learner, "
        f"{best['job_vs_compute_only']:.2f}x compute-only"
    )
    print(headline)
    path = C.write_result(
        args.out,
        "throughput",
        args,
        {"events": stats.events, "rows": rows, "figures": figures(rows), "headline": headline},
        config=C.config(base),
    )
    plot_timelines(rows, path.with_suffix(".png"))
    print(f"wrote {path.with_suffix('.png')}")
    return 0


ENCODER_NAMES = {"none": "id-only", "minilm": "MiniLM"}


def figures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (parallelism, encoder): the job's steady events/s against each baseline of the
    same run, the upstream run against the pass-through, and the steady CPU per event."""
    best = max(rows, key=lambda r: r["job_events_per_s"])
    out = []
    for r in rows:
        run = f"p{r['parallelism']}, {ENCODER_NAMES.get(r['encoder'], r['encoder'])}"
        job = r["job_events_per_s"]
        out += [
            C.figure(
                f"job, {run}", job, "events/s", "pass-through", r["passthrough_events_per_s"],
                headline=r is best,
            ),
            C.figure(
                f"job, {run}", job, "events/s", "upstream (the job without its learner)",
                r["upstream_events_per_s"],
            ),
            C.figure(
                f"job, {run}", job, "events/s", "compute-only (no Flink)",
                r["compute_only_events_per_s"],
            ),
            C.figure(
                f"upstream, {run}", r["upstream_events_per_s"], "events/s", "pass-through",
                r["passthrough_events_per_s"],
            ),
            C.figure(
                f"job CPU per event (steady), {run}", r["job_steady_cpu_us_per_event"], "us",
                "pass-through", r["passthrough_steady_cpu_us_per_event"],
            ),
        ]  # fmt: skip
    return out


def learning_timeline(
    firings: list[tuple[float, int]], bucket_s: float = 1.0
) -> list[tuple[float, float]]:
    """(seconds since the first firing, events per second) for each ``bucket_s`` bucket.

    ``firings``: (wall time at the end of a firing, events_seen after it), in time order;
    a firing's events count in the bucket where it ended. A bucket without a firing is a
    second in which the trainer learned nothing (it waited for its input, or for a CPU).
    """
    if len(firings) < 2:
        return []
    t0 = firings[0][0]
    counts = [0] * (int((firings[-1][0] - t0) // bucket_s) + 1)
    for (_, n_prev), (t, n) in itertools.pairwise(firings):
        counts[int((t - t0) // bucket_s)] += n - n_prev
    return [(round(i * bucket_s, 3), c / bucket_s) for i, c in enumerate(counts)]


def plot_timelines(rows: list[dict[str, Any]], path: Path) -> None:
    """One panel per text encoder: the trainer's events/s each second of every job run
    (solid) and upstream run (dashed), with the pass-through rate in the legend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    encoders = list(dict.fromkeys(r["encoder"] for r in rows))
    fig = Figure(figsize=(13, 3.6 * len(encoders)), dpi=100)
    FigureCanvasAgg(fig)
    for i, enc in enumerate(encoders):
        ax = fig.add_subplot(len(encoders), 1, i + 1)
        for j, r in enumerate(r for r in rows if r["encoder"] == enc):
            for run, style in (("job", "-"), ("upstream", "--")):
                tl = r[run].get("timeline") or []
                ax.plot(
                    [t for t, _ in tl],
                    [v for _, v in tl],
                    style,
                    color=f"C{j}",  # one colour per parallelism: job solid, upstream dashed
                    linewidth=2.0 if run == "job" else 1.2,
                    label=(
                        f"p{r['parallelism']} {run} (mean {r[run]['events_per_s']:,.0f}/s; "
                        f"pass-through {r['passthrough_events_per_s']:,.0f}/s)"
                    ),
                )
        ax.set_title(f"text encoder {enc}: events learned (job) or counted (upstream) per second")
        ax.set_xlabel("seconds since the trainer's first firing")
        ax.set_ylabel("events/s")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)


def _steady_cpu(cpu, t0: float, t1: float, events_per_s: float | None) -> dict[str, Any]:
    """The steady-state window's cores in use (all, and per process) and CPU us per event."""
    cores = cpu.rate(t0, t1)
    return {
        "steady_cores": cores,
        "steady_cores_by_process": cpu.cores(t0, t1),
        "steady_waiting_for_cpu_by_process": cpu.waiting(t0, t1),
        "steady_cpu_us_per_event": (
            cores * 1e6 / events_per_s if cores is not None and events_per_s else None
        ),
    }


def _per_event(cpu: dict[str, Any] | None, events: int) -> float | None:
    """A run's CPU microseconds per event (start-up included); None without /proc."""
    return cpu["total_s"] * 1e6 / events if cpu and events else None


_COLS = [
    "parallelism", "encoder", "job_events_per_s", "passthrough_events_per_s",
    "upstream_events_per_s", "compute_only_events_per_s", "job_vs_passthrough",
    "job_vs_upstream", "upstream_vs_passthrough", "job_vs_compute_only",
    "job_steady_cpu_us_per_event", "passthrough_steady_cpu_us_per_event",
    "compute_only_cpu_us_per_sample",
    "job_steady_s", "job_versions",
]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
