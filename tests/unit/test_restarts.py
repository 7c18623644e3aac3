"""flink_job/restarts.py against a stand-in of the Flink REST API (canned documents)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from flink_job.restarts import RestartWatcher

TRACE = """java.io.IOException: Could not perform checkpoint 4 for operator trainer -> Map (1/1)
\tat org.apache.flink.Foo.bar(Foo.java:1)
Caused by: java.lang.RuntimeException: Error while waiting for BeamPythonFunctionRunner flush
\tat org.apache.flink.Baz.qux(Baz.java:2)
Caused by: java.io.EOFException: the Python worker's connection closed
"""


def test_each_failure_and_its_restored_checkpoint_are_reported_once():
    docs = {
        "exceptions": {"exceptionHistory": {"entries": []}},
        "checkpoints": {"counts": {"completed": 3}, "latest": {"restored": None}},
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(docs[self.path.rsplit("/", 1)[1]]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        w = RestartWatcher(f"127.0.0.1:{server.server_address[1]}", "jid")
        assert w.poll() == []
        docs["exceptions"]["exceptionHistory"]["entries"] = [
            {
                "exceptionName": "java.io.IOException",
                "stacktrace": TRACE,
                "timestamp": 1_700_000_000_000,
                "taskName": "trainer -> Map (1/1) - execution #0",
            }
        ]
        (line,) = w.poll()
        assert line.startswith("restart 1: failed at ") and " in trainer (1/1)" in line
        assert "Could not perform checkpoint 4" in line
        assert "caused by java.io.EOFException: the Python worker's connection closed" in line
        assert "restoring from the last completed checkpoint" in line
        assert w.poll() == []  # reported once
        docs["checkpoints"]["latest"]["restored"] = {
            "id": 3,
            "restore_timestamp": 1_700_000_001_000,
            "external_path": "file:/ck/chk-3",
        }
        (line,) = w.poll()
        assert "restart 1:" in line and "restored from checkpoint 3 (file:/ck/chk-3)" in line
        assert w.poll() == [] and w.restarts[0].restored_checkpoint == 3
    finally:
        server.shutdown()


def test_an_unreachable_endpoint_reports_nothing():
    assert RestartWatcher("127.0.0.1:9", "jid").poll() == []
