"""`rtrec savepoint` against a stand-in for the JobManager's REST API (no JVM)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flink_job.savepoints import SavepointError, trigger_savepoint

DECLINED = {
    "failure-cause": {
        "class": "java.util.concurrent.CompletionException",
        "stack-trace": "CheckpointException: Checkpoint was declined (task is closing)\n\tat ...",
    }
}


class FakeJobManager(ThreadingHTTPServer):
    """Answers savepoint triggers with the given outcomes, in order (the last repeats)."""

    def __init__(self, outcomes: list[dict], job_state: str = "RUNNING") -> None:
        self.outcomes = outcomes
        self.job_state = job_state
        self.triggers = 0

        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                server.triggers += 1
                self._reply({"request-id": f"t{server.triggers}"})

            def do_GET(self) -> None:
                if "/savepoints/" in self.path:
                    n = int(self.path.rsplit("/t", 1)[1])
                    op = server.outcomes[min(n, len(server.outcomes)) - 1]
                    self._reply({"status": {"id": "COMPLETED"}, "operation": op})
                else:
                    self._reply({"state": server.job_state})

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


def test_a_savepoint_declined_while_a_task_finishes_is_triggered_again(tmp_path) -> None:
    jm = FakeJobManager([DECLINED, DECLINED, {"location": "file:/sp/savepoint-1"}])
    try:
        loc = trigger_savepoint(jm.address, "job", str(tmp_path), retry_every_s=0.01)
    finally:
        jm.shutdown()
    assert loc == "file:/sp/savepoint-1"
    assert jm.triggers == 3


def test_other_savepoint_failures_and_ended_jobs_are_not_retried(tmp_path) -> None:
    other = {"failure-cause": {"stack-trace": "IOException: No space left on device"}}
    jm = FakeJobManager([other, {"location": "file:/never"}])
    try:
        with pytest.raises(SavepointError, match="No space left"):
            trigger_savepoint(jm.address, "job", str(tmp_path), retry_every_s=0.01)
        assert jm.triggers == 1
        jm.outcomes, jm.triggers, jm.job_state = [DECLINED], 0, "FINISHED"
        with pytest.raises(SavepointError, match=r"job job is FINISHED.*task is closing"):
            trigger_savepoint(jm.address, "job", str(tmp_path), retry_every_s=0.01)
        assert jm.triggers == 1
    finally:
        jm.shutdown()
