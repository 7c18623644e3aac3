"""Freshness: time from an event being produced to Kafka until a published model version
has learned from it, on the registry path and on the exactly-once Kafka ``models`` path.

The synthetic stream is produced live at ``--rate`` events/s with event time = produce
wall clock (catalogue first). The real job (``build_job``, unbounded, checkpoints every
10 s, exactly-once ``models`` sink) runs on a local mini-cluster. Two watchers record
when each version becomes visible: polling the registry directory (every 50 ms) and a
``read_committed`` consumer of the ``models`` topic (versions are visible there only
when the checkpoint that commits their transaction completes).

Freshness of event e on a path = (first time a version with event-time high-water mark
``event_time_hwm_ms`` >= ts(e) is visible on that path) - produce time of e; p50/p95/p99
over the events produced during the measurement window (which starts ``--warmup`` s
after the first version, so start-up is excluded). Production continues for ``--tail``
s after the window so that watermarks keep advancing past the last measured events.

Baseline measured in the same run: the Kafka transport latency of the ``events`` topic
(produce -> a plain consumer), the floor any consumer sees; printed: path / transport and
exactly-once / registry.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as C


class TransportWatcher(threading.Thread):
    """A consumer of the events topic: receive wall time - record timestamp, per event."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic = bootstrap, topic
        self.lat: list[tuple[int, float]] = []  # (record ts ms, latency s)
        self.stop_flag = threading.Event()

    def run(self) -> None:
        from kafka import KafkaConsumer

        c = KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="latest",
            enable_auto_commit=False,
            fetch_max_wait_ms=10,
        )
        try:
            while not self.stop_flag.is_set():
                for recs in c.poll(timeout_ms=100).values():
                    now = time.time()
                    self.lat.extend((r.timestamp, now - r.timestamp / 1000) for r in recs)
        finally:
            c.close()

    def stop(self) -> None:
        self.stop_flag.set()
        self.join(10)


def freshness(
    produced: list[tuple[int, float]], versions: list[tuple[float, dict]]
) -> tuple[list[float], int]:
    """Per event: first visibility of a version covering it - produce time; + uncovered count."""
    by_time = sorted(versions, key=lambda v: v[0])
    # Running max of the high-water mark over visibility time: a version covers an event
    # once any version visible by then has learned past it.
    marks: list[tuple[float, int]] = []
    hwm = -1
    for seen, m in by_time:
        hwm = max(hwm, int(m["event_time_hwm_ms"]))
        marks.append((seen, hwm))
    out, uncovered = [], 0
    j = 0
    for ts, wall in sorted(produced):
        while j < len(marks) and marks[j][1] < ts:
            j += 1
        if j == len(marks):
            uncovered += 1
        else:
            out.append(marks[j][0] - wall)
    return out, uncovered


def main(argv: list[str] | None = None) -> int:
    p = C.parser("freshness", __doc__)
    p.add_argument("--rate", type=float, default=100.0, help="events/s produced")
    p.add_argument("--duration", type=float, default=300.0, help="measurement window (s)")
    p.add_argument("--warmup", type=float, default=20.0, help="s after the first version")
    p.add_argument("--tail", type=float, default=45.0, help="s of production after the window")
    p.add_argument("--encoder", default="minilm", help="model.text_encoder")
    p.add_argument("--parallelism", type=int, default=1)
    p.add_argument("--checkpoint-ms", type=int, default=10_000)
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--workdir", default="")
    args = p.parse_args(argv)
    if args.quick:
        args.rate, args.duration, args.warmup, args.tail, args.encoder = 30, 40, 5, 30, "none"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rtrec-bench-freshness-"))
    from flink_job.job import build_job, make_env

    total_events = int(args.rate * (args.startup_timeout + args.warmup + args.duration + args.tail))
    cfg = C.config([
        *C.topic_overrides("fresh"),
        f"replay.num_events={total_events}",
        "replay.malformed_fraction=0.0",
        f"model.text_encoder='{args.encoder}'",
        f"job.parallelism={args.parallelism}",
        f"job.checkpoint_interval_ms={args.checkpoint_ms}",
        "job.retain_checkpoints=false",
        f"job.checkpoint_dir='{work / 'checkpoints'}'",
        f"export.registry_dir='{work / 'registry'}'",
        "export.kafka_delivery='exactly_once'",
        *args.set,
    ])  # fmt: skip
    result: dict[str, Any] = {}
    try:
        with C.embedded_kafka(work) as bootstrap:
            k = cfg.kafka
            C.create_all_topics(cfg, bootstrap)
            reg = C.RegistryWatcher(Path(cfg.export.registry_dir), cfg.job.model_key)
            topic = C.ModelsTopicWatcher(bootstrap, k.models_topic)
            transport = TransportWatcher(bootstrap, k.events_topic)
            for w in (reg, topic, transport):
                w.start()
            topic.ready.wait(30)
            env = make_env(cfg)
            build_job(env, cfg, bootstrap)
            client = env.execute_async("rtrec-bench-freshness")
            t_submit = time.time()
            producer = C.LiveProducer(cfg, bootstrap, args.rate, limit_s=1e9)
            producer.start()
            try:
                deadline = time.monotonic() + args.startup_timeout
                while not reg.seen:
                    if time.monotonic() > deadline or producer.error:
                        raise RuntimeError(f"no model version yet ({producer.error or 'timeout'})")
                    time.sleep(0.2)
                t_first = min(t for t, _ in reg.seen.values())
                C.log(f"first version {t_first - t_submit:.1f}s after submit; measuring")
                w0 = t_first + args.warmup
                w1 = w0 + args.duration
                time.sleep(max(0.0, w1 + args.tail - time.time()))
            finally:
                producer.stop()
                client.cancel().result()
            for w in (reg, topic, transport):
                w.stop()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    window = [(ts, wall) for ts, wall in producer.produced if w0 <= wall < w1]
    tr = C.percentiles([lat for ts, lat in transport.lat if w0 * 1000 <= ts < w1 * 1000])
    rows = []
    for name, versions in (("registry", reg.versions()), ("kafka exactly-once", topic.seen)):
        lat, uncovered = freshness(window, versions)
        pc = C.percentiles(lat)
        rows.append({
            "path": name,
            **{f"{k}_s": v for k, v in pc.items()},
            "events": len(lat),
            "uncovered": uncovered,
            "versions": len(versions),
            "p50_vs_transport": C.ratio(pc["p50"], tr["p50"]),
        })  # fmt: skip
    rows.append({
        "path": "baseline: events topic transport",
        **{f"{k}_s": v for k, v in tr.items()},
        "events": len([1 for ts, _ in transport.lat if w0 * 1000 <= ts < w1 * 1000]),
    })  # fmt: skip
    eo_vs_reg = C.ratio(rows[1]["p50_s"], rows[0]["p50_s"])
    # Where the registry path's time goes: how far behind its newest event a version is
    # when it becomes visible, and the time between consecutive versions.
    in_window = [(seen, m) for seen, m in reg.versions() if w0 <= seen < w1]
    staleness = C.percentiles([seen - int(m["event_time_hwm_ms"]) / 1000 for seen, m in in_window])
    seen_times = sorted(seen for seen, _ in in_window)
    gaps = C.percentiles([b - a for a, b in itertools.pairwise(seen_times)])
    C.log(
        "registry versions: staleness at visibility p50/p95 "
        f"{staleness['p50'] or 0:.2f}/{staleness['p95'] or 0:.2f} s, gap between versions "
        f"p50/p95 {gaps['p50'] or 0:.2f}/{gaps['p95'] or 0:.2f} s"
    )
    cols = [
        "path",
        "p50_s",
        "p95_s",
        "p99_s",
        "events",
        "uncovered",
        "versions",
        "p50_vs_transport",
    ]
    print(C.table(rows, cols))
    headline = (
        f"freshness p50/p95/p99: registry {_fmt(rows[0])}, exactly-once Kafka {_fmt(rows[1])} "
        f"({eo_vs_reg or float('nan'):.2f}x registry p50); transport p50 "
        f"{(tr['p50'] or 0) * 1000:.0f} ms"
    )
    print(headline)
    result = {
        "rows": rows,
        "exactly_once_vs_registry_p50": eo_vs_reg,
        "registry_version_staleness_s": staleness,
        "registry_version_gap_s": gaps,
        "first_version_after_submit_s": t_first - t_submit,
        "produced_in_window": len(window),
        "headline": headline,
    }
    result["figures"] = figures(rows)
    C.write_result(args.out, "freshness", args, result, config=cfg)
    return 0


def figures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each path's p50/p95/p99 against the events topic's transport latency at the same
    percentile, and the exactly-once path's p50 against the registry's."""
    registry, exactly_once, transport = rows[0], rows[1], rows[2]
    out = []
    for r, name in ((registry, "registry"), (exactly_once, "exactly-once Kafka")):
        for q in ("p50", "p95", "p99"):
            out.append(
                C.figure(
                    f"freshness {q}, {name}", r[f"{q}_s"], "s", f"Kafka transport {q}",
                    transport[f"{q}_s"], headline=q == "p50" and r is registry,
                )
            )  # fmt: skip
    out.append(
        C.figure(
            "freshness p50, exactly-once Kafka", exactly_once["p50_s"], "s", "registry p50",
            registry["p50_s"], headline=True,
        )
    )  # fmt: skip
    return out


def _fmt(r: dict) -> str:
    return (
        "/".join("-" if r[k] is None else f"{r[k]:.1f}" for k in ("p50_s", "p95_s", "p99_s")) + " s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
