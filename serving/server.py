"""`rtrec serve`: the HTTP front end over the hot-swapping ONNX recommender.

A bare ASGI application on uvicorn (httptools parser, uvloop event loop, HTTP/1.1
keep-alive). A framework's routing and request objects would cost more per request than
the model call (~0.05 ms on a laptop core), so the few routes are matched here directly.

    POST /recommend  {"history": [...], "exclude": [...], "k": 10, "skip_unknown": false}
    GET  /recommend?history=a,b,c&k=10[&exclude=x,y][&skip_unknown=1]
         -> {"version": ..., "items": [[id, score], ...]}
         (nothing in the history or in ``exclude`` is recommended; item ids the serving
         version does not know are a 422 unless ``skip_unknown``)
    GET  /v2/health/live, /v2/health/ready      (KServe / Triton v2 health paths)
    GET  /v2/models/<model_key>                 the serving version's metadata
    GET  /health                                 {"version": ...}, 503 before the first
    GET  /metrics                                Prometheus text format

The model call runs on the event loop: it is shorter than a hand-off to a thread pool
would be. Requests that are ready in the same turn of the loop are ranked in one call
(:class:`Batcher`): one history alone costs about as much as a few dozen together, so under
load the batches grow and the server keeps up, while a lone request waits for nothing.
Loading a new version runs in a thread, so requests never wait for it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from models.serving import HotSwapRecommender

log = logging.getLogger(__name__)
MAX_BODY = 64 * 1024
MAX_K = 1000
# Request latency histogram buckets, seconds.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
ROUTES = ("/recommend", "/health", "/metrics", "/v2/health/live", "/v2/health/ready")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class BadRequest(Exception):
    """A 4xx answer: ``status`` and a message that says what to send instead."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Metrics:
    """Request counters by route and status, and a latency histogram (Prometheus)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_n = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        i = 0
        while i < len(BUCKETS) and seconds > BUCKETS[i]:
            i += 1
        self.buckets[i] += 1
        self.latency_sum += seconds
        self.latency_n += 1

    def render(self, rec: HotSwapRecommender) -> str:
        key = rec.model_key
        lines = [
            "# HELP rtrec_requests_total HTTP requests by route and status.",
            "# TYPE rtrec_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'rtrec_requests_total{{route="{route}",status="{status}"}} {n}')
        lines += [
            "# HELP rtrec_request_seconds Request latency, from request to response.",
            "# TYPE rtrec_request_seconds histogram",
        ]
        acc = 0
        for le, n in zip([*map(str, BUCKETS), "+Inf"], self.buckets, strict=True):
            acc += n
            lines.append(f'rtrec_request_seconds_bucket{{le="{le}"}} {acc}')
        lines += [
            f"rtrec_request_seconds_sum {self.latency_sum:.6f}",
            f"rtrec_request_seconds_count {self.latency_n}",
        ]
        number = 0
        if rec.version_name:
            number = int(rec.version_name[1:].split("-")[0])
        age = time.time() - rec.loaded_at if rec.loaded_at else math.nan
        gauges = [
            ("serving_version", "Version number serving now (0 = none).", number, "gauge"),
            ("model_age_seconds", "Seconds since the serving version was written.", age, "gauge"),
            ("swaps_total", "Versions swapped in.", rec.swaps, "counter"),
            ("rollbacks_total", "Swaps to a lower version number.", rec.rollbacks, "counter"),
            (
                "load_failures_total",
                "Versions that failed to load or probe.",
                rec.load_failures,
                "counter",
            ),
        ]
        for name, help_, value, kind in gauges:
            lines += [
                f"# HELP rtrec_{name} {help_}",
                f"# TYPE rtrec_{name} {kind}",
                f'rtrec_{name}{{model_key="{key}"}} {value}',
            ]
        return "\n".join(lines) + "\n"


def _ids(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(x, str | int) for x in value):
        raise BadRequest(400, f'"{field}" must be a list of item id strings')
    return [str(x) for x in value]


def _k(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise BadRequest(400, f"k must be an integer in 1..{MAX_K}")
    try:
        k = int(value)
    except ValueError:
        raise BadRequest(400, f"k must be an integer in 1..{MAX_K}, got {value!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(400, f"k must be an integer in 1..{MAX_K}, got {k}")
    return k


def parse_query(query: str) -> dict[str, Any]:
    """GET parameters as the POST body's fields."""
    q = parse_qs(query)

    def listed(name: str) -> list[str]:
        return [x for x in q.get(name, [""])[0].split(",") if x]

    return {
        "history": listed("history"),
        "exclude": listed("exclude"),
        "k": q.get("k", ["10"])[0],
        "skip_unknown": q.get("skip_unknown", ["0"])[0].lower() in ("1", "true", "yes"),
    }


def parse_body(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadRequest(
            400, f'the body is not valid JSON ({e}); send {{"history": [...]}}'
        ) from None
    if not isinstance(doc, dict):
        raise BadRequest(400, 'the body must be a JSON object like {"history": [...], "k": 10}')
    unknown = sorted(set(doc) - {"history", "exclude", "k", "skip_unknown"})
    if unknown:
        raise BadRequest(
            400, f"unknown field(s) {', '.join(unknown)}; use history, exclude, k, skip_unknown"
        )
    return doc


class Batcher:
    """Ranks the requests submitted in one turn of the event loop with one model call."""

    def __init__(self, rec: HotSwapRecommender, max_batch: int = 64) -> None:
        self.rec = rec
        self.max_batch = max_batch
        self._pending: list[tuple[list[str], list[str], int, asyncio.Future[Any]]] = []
        self._scheduled = False

    def submit(
        self, history: list[str], exclude: list[str], k: int
    ) -> asyncio.Future[tuple[str, list[tuple[str, float]]]]:
        """A future of (version name, top-k items) for one request."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._pending.append((history, exclude, k, fut))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._run)
        return fut

    def _run(self) -> None:
        batch = self._pending[: self.max_batch]
        self._pending = self._pending[self.max_batch :]
        self._scheduled = bool(self._pending)
        if self._pending:
            asyncio.get_running_loop().call_soon(self._run)
        try:
            name, rec = self.rec.snapshot()
            top = rec.recommend(
                [b[0] for b in batch], max(b[2] for b in batch), [b[1] for b in batch]
            )
        except Exception as e:
            for *_, fut in batch:
                if not fut.done():
                    fut.set_exception(e)
            return
        for (_, _, k, fut), items in zip(batch, top, strict=True):
            if not fut.done():
                fut.set_result((name, items[:k]))


class ServingApp:
    """The ASGI application. ``poll_s``: how often LATEST is checked (0 = never; tests
    call ``rec.refresh()`` themselves)."""

    def __init__(self, rec: HotSwapRecommender, poll_s: float = 2.0) -> None:
        self.rec = rec
        self.poll_s = poll_s
        self.metrics = Metrics()
        self.batcher = Batcher(rec)
        self._poller: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await loop.run_in_executor(None, self.rec.refresh)
            except Exception:
                log.exception("checking LATEST failed; still serving %s", self.rec.version_name)
            await asyncio.sleep(self.poll_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        path = scope["path"]
        try:
            status, body, ctype = await self._route(scope, receive, path)
        except BadRequest as e:
            status, body, ctype = e.status, _json({"error": str(e)}), b"application/json"
        except Exception as e:  # never leave a request without an answer
            log.exception("request to %s failed", path)
            status, body, ctype = (
                500,
                _json({"error": f"{type(e).__name__}: {e}"}),
                b"application/json",
            )
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
        route = (
            path
            if path in ROUTES
            else ("/v2/models" if path.startswith("/v2/models/") else "other")
        )
        self.metrics.observe(route, status, time.perf_counter() - started)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                if self.poll_s > 0:
                    self._poller = asyncio.get_running_loop().create_task(self._poll())
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                if self._poller is not None:
                    self._poller.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _route(self, scope: Scope, receive: Receive, path: str) -> tuple[int, bytes, bytes]:
        method = scope["method"]
        js = b"application/json"
        if path == "/recommend":
            if method == "POST":
                req = parse_body(await _body(receive))
            elif method == "GET":
                req = parse_query(scope.get("query_string", b"").decode("latin-1"))
            else:
                raise BadRequest(405, "use GET or POST on /recommend")
            return 200, _json(await self._recommend(req)), js
        if method != "GET":
            raise BadRequest(405, f"use GET on {path}")
        rec = self.rec
        if path == "/metrics":
            return 200, self.metrics.render(rec).encode(), b"text/plain; version=0.0.4"
        if path == "/v2/health/live":
            return 200, _json({"live": True}), js
        if path in ("/v2/health/ready", "/health"):
            ready = rec.current is not None
            doc = {"ready": ready} if path != "/health" else {}
            return (200 if ready else 503), _json({**doc, "version": rec.version_name}), js
        if path == f"/v2/models/{rec.model_key}":
            cur = rec.current
            if cur is None:
                raise BadRequest(503, "no model version is serving yet")
            return (
                200,
                _json(
                    {
                        "name": rec.model_key,
                        "versions": [rec.version_name],
                        "platform": "onnxruntime_onnx",
                        "items": len(cur.item_ids),
                        "history_length": cur.history_length,
                        "publication": cur.manifest.get("publication", {}),
                    }
                ),
                js,
            )
        raise BadRequest(
            404, f"unknown path {path}; use /recommend, /metrics, /v2/health/ready or /health"
        )

    async def _recommend(self, req: dict[str, Any]) -> dict[str, Any]:
        history = _ids(req.get("history"), "history")
        exclude = _ids(req.get("exclude"), "exclude")
        k = _k(req.get("k", 10))
        skip = req.get("skip_unknown", False)
        if not isinstance(skip, bool):
            raise BadRequest(400, '"skip_unknown" must be true or false')
        try:
            rec = self.rec.serving()
        except RuntimeError as e:
            raise BadRequest(503, str(e)) from None
        unknown = [x for x in history if x not in rec.index]
        if unknown and not skip:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise BadRequest(
                422,
                f"{len(unknown)} history item(s) unknown to version {self.rec.version_name}: "
                f"{shown}; send skip_unknown=true to rank from the known ones",
            )
        try:
            version, items = await self.batcher.submit(history, exclude, k)
        except RuntimeError as e:
            raise BadRequest(503, str(e)) from None
        return {"version": version, "items": items, "unknown": unknown}


async def _body(receive: Receive) -> bytes:
    chunks, size = [], 0
    while True:
        msg = await receive()
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise BadRequest(413, f"the body is over {MAX_BODY} bytes; send fewer history items")
        chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks)


def _json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def serve(
    registry: Path,
    model_key: str,
    host: str,
    port: int,
    poll_s: float,
    threads: int = 1,
) -> None:
    """Run the server until interrupted. ``threads``: onnxruntime intra-op threads; one is
    right for the small per-request graphs, and leaves the other cores to more requests."""
    import uvicorn

    rec = HotSwapRecommender(registry, model_key, threads=threads)
    rec.refresh()
    log.info("serving %s/%s on http://%s:%d/recommend", registry, model_key, host, port)
    uvicorn.run(
        ServingApp(rec, poll_s),
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
    )


@contextmanager
def running(
    rec: HotSwapRecommender, host: str = "127.0.0.1", port: int = 0, poll_s: float = 0.0
) -> Iterator[tuple[ServingApp, int]]:
    """The server in a background thread (tests, benchmarks): yields the app and the
    bound port (``port`` 0 = a free one), and stops the server on exit."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    app = ServingApp(rec, poll_s)
    config = uvicorn.Config(
        app, loop="uvloop", http="httptools", lifespan="on", access_log=False, log_level="warning"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the HTTP server did not start within 30 s")
        time.sleep(0.01)
    try:
        yield app, sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
