"""`rtrec serve`: a small HTTP front end over the hot-swapping ONNX recommender.

GET /recommend?history=item1,item2,...&k=10[&exclude=item7,...]
                                              -> {"version": ..., "items": [[id, score], ...]}
    (no history item is recommended, nor any ``exclude`` item)
GET /health                                   -> {"version": ...}
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from models.serving import HotSwapRecommender

log = logging.getLogger(__name__)


def make_server(rec: HotSwapRecommender, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            url = urlparse(self.path)
            q = parse_qs(url.query)
            if url.path == "/health":
                self._send(200 if rec.current else 503, {"version": rec.version_name})
                return
            if url.path != "/recommend":
                self._send(404, {"error": f"unknown path {url.path}; use /recommend or /health"})
                return
            try:
                k = int(q.get("k", ["10"])[0])
                if not 1 <= k <= 1000:
                    raise ValueError
            except ValueError:
                self._send(400, {"error": "k must be an integer in 1..1000"})
                return
            history = [h for h in q.get("history", [""])[0].split(",") if h]
            exclude = [x for x in q.get("exclude", [""])[0].split(",") if x]
            try:
                items = rec.recommend([history], k, [exclude])[0]
            except RuntimeError as e:
                self._send(503, {"error": str(e)})
                return
            self._send(200, {"version": rec.version_name, "items": items})

        def log_message(self, fmt: str, *args: object) -> None:
            log.debug(fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)


def serve(registry: Path, model_key: str, host: str, port: int, poll_s: float) -> None:
    rec = HotSwapRecommender(registry, model_key)
    rec.refresh()
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                rec.refresh()
            except Exception:
                log.exception(
                    "loading the latest version failed; still serving %s", rec.version_name
                )
            stop.wait(poll_s)

    threading.Thread(target=poll, daemon=True).start()
    server = make_server(rec, host, port)
    log.info("serving %s/%s on http://%s:%d/recommend", registry, model_key, host, port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()
        time.sleep(0)
