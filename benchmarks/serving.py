"""Serving under open-loop load: `rtrec serve` on loopback, with hot swaps.

A model version (id-only towers and the transition memory, over ``--items`` items) is
trained on Zipf samples and published; `rtrec serve` runs in its own process. For each
offered load, requests (``POST /recommend`` with a 20-item history, k = 10) are
*scheduled* at a fixed rate, whatever the server's answers (open loop); a request's
latency runs from its scheduled time to its answer, so a stalled server shows as
latency, not as a lower offered load. Meanwhile ``--swaps`` newer versions are published
at even intervals and the server hot-swaps them; every non-200 answer or broken
connection is an error.

Figures per offered load: achieved req/s, p50 / p99 / p99.9 latency (ms), errors; the
baseline is one onnxruntime call of the same graph (``OnnxRecommender.recommend``, one
history) in the same run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import _common as C
from catalogue import make_samples


def build_versions(n_items: int, count: int, out: Path) -> list[Any]:
    """``count`` successive versions of one model key, trained on Zipf samples."""
    import torch

    from models.config import ModelConfig, TrainerConfig
    from models.export import build_version
    from models.trainer import OnlineLearner, new_meta

    learner = OnlineLearner(
        ModelConfig(text_encoder="none"), TrainerConfig(batch_size=256), torch.device("cpu")
    )
    meta = new_meta("bench")
    samples = make_samples(n_items, 256 * 4 * count, 20)
    versions = []
    for i in range(count):
        for j in range(4):
            at = (i * 4 + j) * 256
            learner.learn(samples[at : at + 256], meta)
        v = build_version(learner, meta, 50, {})
        meta["version"] = v.version
        versions.append(v)
    return versions


def one_call_ms(path: Path, history: list[str], n: int) -> dict[str, float | None]:
    from models.serving import OnnxRecommender

    rec = OnnxRecommender(path, gpu=False, threads=1)
    for _ in range(50):
        rec.recommend([history], 10)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        rec.recommend([history], 10)
        times.append((time.perf_counter() - t) * 1000)
    return C.percentiles(times, (50, 99))


async def offered_load(
    port: int, rate: float, seconds: float, bodies: list[bytes], connections: int
) -> dict[str, Any]:
    """Open loop: request i is due at start + i / rate; ``connections`` keep-alive
    connections take the due requests in turn."""
    n = int(rate * seconds)
    latencies: list[float] = []
    errors = 0
    next_i = 0
    start = time.perf_counter() + 0.2

    async def worker() -> None:
        nonlocal next_i, errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while next_i < n:
            i = next_i
            next_i += 1
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = bodies[i % len(bodies)]
            head = (
                f"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            try:
                writer.write(head + body)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                if b" 200 " not in status_line:
                    errors += 1
            except (OSError, asyncio.IncompleteReadError):
                errors += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            latencies.append((time.perf_counter() - due) * 1000)
        writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    took = time.perf_counter() - start
    pct = C.percentiles(latencies, (50, 99))
    ordered = sorted(latencies)
    p999 = ordered[min(len(ordered) - 1, int(0.999 * len(ordered)))] if ordered else None
    return {
        "offered_rps": rate,
        "achieved_rps": len(latencies) / took,
        "p50_ms": pct["p50"],
        "p99_ms": pct["p99"],
        "p999_ms": p999,
        "errors": errors,
        "requests": n,
    }


def wait_ready(port: int, timeout: float = 60) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"rtrec serve did not get ready on port {port} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = C.parser("serving", __doc__)
    p.add_argument("--items", type=int, default=10_000, help="catalogue size of the model")
    p.add_argument("--loads", default="500,1000,2000,5000", help="offered req/s, comma-separated")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of each load")
    p.add_argument("--connections", type=int, default=32, help="client keep-alive connections")
    p.add_argument("--swaps", type=int, default=10, help="hot swaps during the whole run")
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.loads, args.seconds, args.swaps = 1000, "200,500", 3.0, 3
    loads = [float(x) for x in args.loads.split(",")]

    from models.registry import publish

    registry = Path(tempfile.mkdtemp(prefix="rtrec-serving-bench-"))
    C.log(f"training {args.swaps + 1} versions over {args.items} items")
    versions = build_versions(args.items, args.swaps + 1, registry)
    publish(registry, versions[0])
    item_ids = json.loads(versions[0].extras["item_ids.json"])
    rng = random.Random(0)
    histories = [rng.sample(item_ids, 20) for _ in range(256)]
    bodies = [json.dumps({"history": h, "k": 10}).encode() for h in histories]
    one = one_call_ms(registry / "bench" / versions[0].name / "model.onnx", histories[0], 2000)
    C.log(f"one onnxruntime call: p50 {one['p50']:.3f} ms, p99 {one['p99']:.3f} ms")

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(C.REPO)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rtrec.cli",
            "serve",
            "--registry",
            str(registry),
            "--port",
            str(port),
            "--poll-s",
            "0.2",
            "--set",
            "job.model_key='bench'",
        ],
        env=env,
    )
    rows = []
    try:
        wait_ready(port)
        total = len(loads) * args.seconds
        stop = threading.Event()

        def swapper() -> None:
            for v in versions[1:]:
                if stop.wait(total / (args.swaps + 1)):
                    return
                publish(registry, v)

        t = threading.Thread(target=swapper, daemon=True)
        t.start()
        for rate in loads:
            C.log(f"offered load {rate:.0f} req/s for {args.seconds:.0f} s")
            r = asyncio.run(offered_load(port, rate, args.seconds, bodies, args.connections))
            C.log(
                f"  achieved {r['achieved_rps']:.0f} req/s, p50 {r['p50_ms']:.2f} ms, "
                f"p99 {r['p99_ms']:.2f} ms, p99.9 {r['p999_ms']:.2f} ms, errors {r['errors']}"
            )
            rows.append(r)
        stop.set()
        t.join()
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        swaps = next(
            int(float(line.split()[-1]))
            for line in metrics.splitlines()
            if line.startswith("rtrec_swaps_total")
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(C.table(rows))
    print(f"swaps seen by the server: {swaps} (1 initial load + hot swaps)")
    base = "one onnxruntime call, p99"
    figures = []
    for r in rows:
        rate = int(r["offered_rps"])
        figures += [
            C.figure(
                f"achieved req/s at {rate} offered",
                r["achieved_rps"],
                "req/s",
                "offered",
                r["offered_rps"],
            ),
            C.figure(
                f"p99 latency at {rate} req/s",
                r["p99_ms"],
                "ms",
                base,
                one["p99"],
                headline=rate == 1000,
            ),
            C.figure(f"errors at {rate} req/s", float(r["errors"]), "requests"),
        ]
    C.write_result(
        args.out,
        "serving",
        args,
        {
            "rows": rows,
            "one_call_ms": one,
            "swaps": swaps,
            "errors": sum(r["errors"] for r in rows),
            "figures": figures,
        },
    )
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
