"""State: checkpoint size and duration vs the number of users and items.

For each size (users x items, e.g. 1k, 4k, 16k of each) a stream where every user has
exactly ``--events-per-user`` events (users interleaved, items half uniform, half Zipf,
so every user and nearly every item gets state) and every item a catalogue record with
text is written into its own topics, and the job runs on a standalone Flink cluster
(JobManager + 1 TaskManager, ``infra.cluster.StandaloneCluster``) with checkpointing
every 10 s. Once (nearly) every event has reached the trainer (its read-records metric),
two more checkpoints complete, and the last one's figures are read from the JobManager
REST API (``/jobs/<id>/checkpoints`` and ``.../checkpoints/details/<id>``): total
checkpointed state, end-to-end duration, and the share of the user-window and trainer
operators.

Baseline measured in the same run: the smallest size; printed: state / smallest next
to size / smallest, and a least-squares line state = a + b * users (with R^2) to show
linear growth.

``--demo`` measures the demo workload instead (what ``rtrec demo`` trains on: the default
synthetic dataset and model, as a bounded job on the same cluster): size and end-to-end
duration of every checkpoint completed during the run (min / median / max), while the
job is under load.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C


def latest_manifest(registry: Path) -> dict | None:
    ms = C.manifests_by_mtime(registry)
    return max((m for _, m in ms), key=lambda m: m["events_seen"], default=None)


def trainer_records_in(address: str, jid: str) -> int:
    """Records (samples + catalogue items) the trainer has read, from the REST job view."""
    j = C.rest_json(address, f"/jobs/{jid}")
    return sum(
        int(v.get("metrics", {}).get("read-records") or 0)
        for v in j["vertices"]
        if "trainer" in v["name"]
    )


def completed(address: str, jid: str) -> int:
    return int(C.rest_json(address, f"/jobs/{jid}/checkpoints")["counts"]["completed"])


def checkpoint_figures(address: str, jid: str) -> dict[str, Any]:
    ck = C.rest_json(address, f"/jobs/{jid}/checkpoints")
    last = ck["latest"]["completed"]
    names = {v["id"]: v["name"] for v in C.rest_json(address, f"/jobs/{jid}")["vertices"]}
    details = C.rest_json(address, f"/jobs/{jid}/checkpoints/details/{last['id']}")
    per_op: dict[str, int] = {}
    for vid, t in (details.get("tasks") or {}).items():
        name = names.get(vid, vid)
        key = (
            "trainer" if "trainer" in name else "user_window" if "user-window" in name else "other"
        )
        per_op[key] = per_op.get(key, 0) + int(
            t.get("checkpointed_size") or t.get("state_size") or 0
        )
    durations = [
        h["end_to_end_duration"] for h in ck.get("history", []) if h.get("status") == "COMPLETED"
    ]
    return {
        "checkpoint_id": last["id"],
        "state_bytes": int(last.get("checkpointed_size") or last.get("state_size") or 0),
        "full_state_bytes": int(last.get("state_size") or 0),
        "duration_ms": int(last["end_to_end_duration"]),
        "duration_ms_max_recent": max(durations) if durations else None,
        "trainer_bytes": per_op.get("trainer"),
        "user_window_bytes": per_op.get("user_window"),
        "other_bytes": per_op.get("other"),
    }


def produce(cfg, bootstrap: str, users: int, items: int, per_user: int) -> dict[str, int]:
    """The size's catalogue + events (event time advancing 200 ms per event)."""
    import json
    import random

    from kafka import KafkaProducer

    from replay.datasets import START_TS_MS, TOPICS

    k = cfg.kafka
    rng = random.Random(7)
    topics = list(TOPICS)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    for i in range(items):
        t = topics[i % len(topics)]
        w = TOPICS[t]
        body = {
            "item_id": f"item{i}",
            "title": f"{w[i % 8].title()} #{i}",
            "text": f"A {t} piece about {w[i % 8]}, {w[(i // 8) % 8]} and {w[(i // 64) % 8]}.",
            "categories": [t],
            "ts": START_TS_MS,
        }
        producer.send(k.items_topic, value=json.dumps(body).encode(), timestamp_ms=START_TS_MS)
    touched: set[int] = set()
    n = users * per_user
    for e in range(n):
        ts = START_TS_MS + 1000 + 200 * e
        u = e % users
        i = rng.randrange(items)
        if rng.random() < 0.5:
            i = min(int(rng.paretovariate(1.0)) - 1, items - 1)
        touched.add(i)
        body = {"event_id": f"e{e}", "user_id": f"user{u}", "item_id": f"item{i}", "ts": ts}
        body["type"] = "click"
        producer.send(
            k.events_topic,
            key=f"user{u}".encode(),
            value=json.dumps(body).encode(),
            timestamp_ms=ts,
        )
    # One event per partition an hour later: the watermark then passes every real event's
    # window, so all of them reach the trainer (these two wait in their own windows).
    last = START_TS_MS + 1000 + 200 * n + 3_600_000
    for part in range(cfg.kafka.partitions):
        body = {"event_id": f"end{part}", "user_id": f"end{part}", "item_id": "item0"}
        body.update(type="click", ts=last)
        producer.send(
            k.events_topic, value=json.dumps(body).encode(), partition=part, timestamp_ms=last
        )
    producer.flush(timeout=120)
    producer.close()
    return {"events": n, "items_in_events": len(touched)}


def size_overrides(work: Path, users: int, items: int, args) -> list[str]:
    """The job's config overrides for one size (its own topics, checkpoints, registry)."""
    tag = f"state-{users}x{items}"
    return [
        *C.topic_overrides(tag),
        f"model.text_encoder='{args.encoder}'",
        f"model.max_items={max(100_000, items)}",
        f"job.checkpoint_interval_ms={args.checkpoint_ms}",
        f"job.checkpoint_dir='{work / tag / 'checkpoints'}'",
        "job.retain_checkpoints=false",
        f"job.state_backend='{args.backend}'",
        f"export.registry_dir='{work / tag / 'registry'}'",
        *args.set,
    ]


def run_size(cluster_addr: str, bootstrap: str, work: Path, users: int, items: int, args) -> dict:
    tag = f"state-{users}x{items}"
    registry = work / tag / "registry"
    ov = size_overrides(work, users, items, args)
    cfg = C.config(ov)
    C.create_all_topics(cfg, bootstrap)
    stats = produce(cfg, bootstrap, users, items, args.events_per_user)
    C.log(f"{tag}: produced {stats['events']} events, {items} items; submitting")
    jid = C.submit_to_cluster(cluster_addr, bootstrap, ov)
    try:
        t0 = time.monotonic()
        # Every event has reached the trainer (a few may wait in the last open windows):
        # read from the job's metrics, as an idle trainer publishes no new version.
        target = int(stats["events"] * 0.97) + items
        while True:
            got = trainer_records_in(cluster_addr, jid)
            if got >= target:
                break
            if time.monotonic() - t0 > args.timeout:
                raise TimeoutError(f"{tag}: trainer read {got}/{target} records")
            if C.rest_json(cluster_addr, f"/jobs/{jid}")["state"] in ("FAILED", "CANCELED"):
                raise RuntimeError(f"{tag}: job {jid} failed; see the cluster logs")
            time.sleep(1)
        n = completed(cluster_addr, jid)
        while completed(cluster_addr, jid) < n + 2:
            if time.monotonic() - t0 > args.timeout:
                raise TimeoutError(f"{tag}: no further checkpoints")
            time.sleep(0.5)
        fig = checkpoint_figures(cluster_addr, jid)
    finally:
        C.cancel_job(cluster_addr, jid)
    m = latest_manifest(registry) or {}
    return {
        "users": users,
        "items": items,
        **stats,
        "model_items": m.get("num_items"),
        "id_rows": m.get("num_id_rows"),
        **fig,
    }


def demo_overrides(work: Path, args) -> list[str]:
    tag = "state-demo"
    return [
        *C.topic_overrides(tag),
        "kafka.bounded=true",
        f"job.checkpoint_interval_ms={args.checkpoint_ms}",
        f"job.checkpoint_dir='{work / tag / 'checkpoints'}'",
        "job.retain_checkpoints=false",
        f"job.state_backend='{args.backend}'",
        f"export.registry_dir='{work / tag / 'registry'}'",
        *args.set,
    ]


def run_demo(cluster_addr: str, bootstrap: str, work: Path, args) -> dict[str, Any]:
    """The demo workload as a bounded job; every completed checkpoint's size and duration."""
    from replay.producer import replay

    tag = "state-demo"
    ov = demo_overrides(work, args)
    cfg = C.config(ov)
    stats = replay(cfg, bootstrap, progress=False)
    C.log(f"{tag}: replayed {stats.events} events, {stats.items} items; submitting")
    jid = C.submit_to_cluster(cluster_addr, bootstrap, ov)
    t0 = time.monotonic()
    while (state := C.rest_json(cluster_addr, f"/jobs/{jid}")["state"]) not in (
        "FINISHED",
        "FAILED",
        "CANCELED",
    ):
        if time.monotonic() - t0 > args.timeout:
            C.cancel_job(cluster_addr, jid)
            raise TimeoutError(f"{tag}: job {jid} not finished after {args.timeout:.0f}s")
        time.sleep(1)
    if state != "FINISHED":
        raise RuntimeError(f"{tag}: job {jid} {state}; see the cluster logs")
    hist = [
        h
        for h in C.rest_json(cluster_addr, f"/jobs/{jid}/checkpoints").get("history", [])
        if h.get("status") == "COMPLETED"
    ]
    if not hist:
        raise RuntimeError(f"{tag}: no checkpoint completed; lower --checkpoint-ms")
    sizes = sorted(int(h.get("checkpointed_size") or h.get("state_size") or 0) for h in hist)
    durations = sorted(int(h["end_to_end_duration"]) for h in hist)
    return {
        "events": stats.events,
        "items": stats.items,
        "job_s": round(time.monotonic() - t0, 1),
        "checkpoints": len(hist),
        "state_mb_min": sizes[0] / 1e6,
        "state_mb_median": sizes[len(sizes) // 2] / 1e6,
        "state_mb_max": sizes[-1] / 1e6,
        "duration_ms_min": durations[0],
        "duration_ms_median": durations[len(durations) // 2],
        "duration_ms_max": durations[-1],
    }


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return a, b, 1 - ss_res / ss_tot if ss_tot else 1.0


def main(argv: list[str] | None = None) -> int:
    p = C.parser("state", __doc__)
    p.add_argument(
        "--sizes", default="1000x1000,4000x4000,16000x16000", help="USERSxITEMS,... (3 sizes)"
    )
    p.add_argument("--events-per-user", type=int, default=5)
    p.add_argument("--encoder", default="minilm", help="model.text_encoder")
    p.add_argument("--backend", default="hashmap", choices=["hashmap", "rocksdb"])
    p.add_argument("--checkpoint-ms", type=int, default=10_000)
    p.add_argument("--timeout", type=float, default=1800.0, help="s per size")
    p.add_argument("--workdir", default="")
    p.add_argument("--demo", action="store_true", help="the demo workload's checkpoints instead")
    args = p.parse_args(argv)
    if args.demo:
        return main_demo(args)
    if args.quick:
        args.sizes, args.encoder, args.checkpoint_ms = "100x100,200x200,400x400", "none", 2000
    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rtrec-bench-state-"))
    rows = []
    try:
        with C.embedded_kafka(work) as bootstrap:
            cluster = C.standalone_cluster(work / "cluster", taskmanagers=1, slots=2)
            try:
                address = cluster.start()
                for users, items in sizes:
                    rows.append(run_size(address, bootstrap, work, users, items, args))
                    print(C.table(rows[-1:], _COLS), flush=True)
            finally:
                cluster.stop()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    base = rows[0]
    for r in rows:
        r["size_vs_smallest"] = C.ratio(r["users"] + r["items"], base["users"] + base["items"])
        r["state_vs_smallest"] = C.ratio(r["state_bytes"], base["state_bytes"])
        r["duration_vs_smallest"] = C.ratio(r["duration_ms"], base["duration_ms"])
        r["state_mb"] = r["state_bytes"] / 1e6
        # What one more user or item costs: the user stage holds per-user state only, the
        # trainer per-item state (id rows, their memory, catalogue entries) and the model.
        if r.get("user_window_bytes") is not None:
            r["bytes_per_user"] = r["user_window_bytes"] / r["users"]
        if r.get("trainer_bytes") is not None:
            r["trainer_bytes_per_item"] = r["trainer_bytes"] / r["items"]
    a, b, r2 = linear_fit([r["users"] for r in rows], [r["state_bytes"] for r in rows])
    print(C.table(rows, _COLS))
    headline = (
        f"checkpoint {rows[-1]['state_mb']:.1f} MB / {rows[-1]['duration_ms']} ms at "
        f"{rows[-1]['users']} users x {rows[-1]['items']} items "
        f"({rows[-1]['state_vs_smallest']:.1f}x state for "
        f"{rows[-1]['size_vs_smallest']:.0f}x size); "
        f"fit {b:.0f} B/user(+item) + {a / 1e6:.2f} MB, R^2 {r2:.3f}"
    )
    print(headline)
    C.write_result(
        args.out,
        "state",
        args,
        {
            "rows": rows,
            "fit": {"intercept_bytes": a, "bytes_per_user": b, "r2": r2},
            "figures": figures(rows, a, b, r2),
            "headline": headline,
        },
        config=C.config(size_overrides(work, *sizes[-1], args)),  # the largest size's
    )
    return 0


def figures(rows: list[dict[str, Any]], a: float, b: float, r2: float) -> list[dict[str, Any]]:
    """Per size: checkpointed state and checkpoint duration against the smallest size (the
    ratio of sizes is in the figure's name), and the fitted line."""
    base = rows[0]
    smallest = f"smallest size, {base['users']:,} users x {base['items']:,} items"
    out = []
    for r in rows:
        size = f"{r['users']:,} users x {r['items']:,} items ({r['size_vs_smallest']:.1f}x size)"
        out += [
            C.figure(
                f"checkpointed state, {size}", r["state_mb"], "MB", smallest, base["state_mb"],
                headline=r is rows[-1] and len(rows) > 1,
            ),
            C.figure(
                f"checkpoint duration, {size}", r["duration_ms"], "ms", smallest,
                base["duration_ms"],
            ),
        ]  # fmt: skip
        if "bytes_per_user" in r and r is rows[-1]:
            out.append(C.figure(f"user-stage state per user, {size}", r["bytes_per_user"], "B"))
        if "trainer_bytes_per_item" in r and r is rows[-1]:
            out.append(
                C.figure(
                    f"trainer state per item (model included), {size}",
                    r["trainer_bytes_per_item"],
                    "B",
                )
            )
    out += [
        C.figure("state per user (+ item), least-squares slope", b, "B"),
        C.figure("state at zero users, least-squares intercept", a / 1e6, "MB"),
        C.figure("R^2 of the line", r2, ""),
    ]
    return out


def main_demo(args) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rtrec-bench-state-"))
    try:
        with C.embedded_kafka(work) as bootstrap:
            cluster = C.standalone_cluster(work / "cluster", taskmanagers=1, slots=2)
            try:
                row = run_demo(cluster.start(), bootstrap, work, args)
            finally:
                cluster.stop()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(C.table([row]))
    headline = (
        f"demo workload: {row['checkpoints']} checkpoints, "
        f"{row['state_mb_min']:.2f}-{row['state_mb_max']:.2f} MB, "
        f"median {row['duration_ms_median']} ms (max {row['duration_ms_max']} ms)"
    )
    print(headline)
    figs = [
        C.figure("checkpoints completed", row["checkpoints"], ""),
        *(C.figure(f"checkpointed state, {q}", row[f"state_mb_{q}"], "MB") for q in _QS),
        *(C.figure(f"checkpoint duration, {q}", row[f"duration_ms_{q}"], "ms") for q in _QS),
    ]
    figs[2]["headline"] = figs[5]["headline"] = True  # the medians
    C.write_result(
        args.out,
        "state_demo",
        args,
        {"row": row, "figures": figs, "headline": headline},
        config=C.config(demo_overrides(work, args)),
    )
    return 0


_QS = ("min", "median", "max")


_COLS = [
    "users", "items", "events", "items_in_events", "state_mb", "state_vs_smallest",
    "size_vs_smallest", "duration_ms", "duration_vs_smallest", "trainer_bytes",
    "user_window_bytes", "bytes_per_user", "trainer_bytes_per_item",
]  # fmt: skip

if __name__ == "__main__":
    raise SystemExit(main())
