"""Timers that a Python function registers are part of the checkpoint that flushes them.

PyFlink 2.2 registers them asynchronously (mailbox mails that run after the snapshot), so
with PyFlink's own operators a savepoint taken while the function's bundle is open holds
its keyed state but not its timers, and after a restore that state never fires
(flink_job/operators.py). The
fault-tolerance e2e tests hit this only now and then; here it happens every time:

1. every element is read into one open bundle (bundle size and time far above the input:
   the Python function sees nothing before the bundle is finished), without a watermark (a
   watermark advance drains the registrations);
2. stop-with-savepoint finishes that bundle: the function stores every element and sets
   its timer while the savepoint is being taken;
3. a restore from the savepoint gets a watermark past every timer: each key must fire, with
   all of its elements.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

from pyflink.common import Duration, Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import KeyedProcessFunction
from pyflink.datastream.connectors.file_system import FileSource, StreamFormat
from pyflink.datastream.state import ListStateDescriptor
from pyflink.java_gateway import get_gateway

from flink_job.job import make_env

KEYS = [f"user-{i:02d}" for i in range(12)]
PER_KEY = 4
END_TS = 10**12  # the restored run's last line: its watermark passes every timer


class LineTs(TimestampAssigner):
    def extract_timestamp(self, value, record_timestamp):
        return int(value.split(",")[1])


class HoldUntilWatermark(KeyedProcessFunction):
    """Keeps a key's elements in a ListState until an event-time timer at the element's
    ts; appends "key count" to the file ``fired`` when it fires."""

    def __init__(self, fired: str) -> None:
        self.fired = fired

    def open(self, runtime_context):
        self.held = runtime_context.get_list_state(ListStateDescriptor("held", Types.LONG()))

    def process_element(self, value, ctx):
        self.held.add(ctx.timestamp())
        ctx.timer_service().register_event_time_timer(ctx.timestamp())
        return iter(())

    def on_timer(self, timestamp, ctx):
        held = list(self.held.get())
        if held:
            self.held.clear()
            with open(self.fired, "a") as f:
                f.write(f"{ctx.get_current_key()} {len(held)}\n")
        return iter(())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(make_cfg, tmp_path: Path, rest_port: int, watermarks: WatermarkStrategy, *overrides):
    cfg = make_cfg("job.parallelism=1", "job.checkpoint_interval_ms=0", *overrides)
    env = make_env(cfg, {"rest.port": str(rest_port), "rest.address": "127.0.0.1"})
    source = (
        FileSource.for_record_stream_format(StreamFormat.text_line_format(), str(tmp_path / "in"))
        .monitor_continuously(Duration.of_millis(100))
        .build()
    )
    (
        env.from_source(source, WatermarkStrategy.no_watermarks(), "lines")
        .uid("lines")
        .assign_timestamps_and_watermarks(watermarks.with_timestamp_assigner(LineTs()))
        .uid("event-time")
        .key_by(lambda line: line.split(",")[0], key_type=Types.STRING())
        .process(
            HoldUntilWatermark(str(tmp_path / "fired")),
            output_type=Types.STRING(),
        )
        .uid("hold")
        .print()
    )
    return env.execute_async("checkpointed-timers")


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def source_records_out(rest_port: int, job_id: str) -> int:
    """Records the file source has emitted into its (Python) chain, from the REST API."""

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{rest_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    for v in get(f"/jobs/{job_id}")["vertices"]:
        if v["name"].startswith("Source: lines"):
            path = f"/jobs/{job_id}/vertices/{v['id']}/metrics"
            names = [m["id"] for m in get(path) if m["id"].endswith("lines.numRecordsOut")]
            if names:
                return int(get(f"{path}?get={names[0]}")[0]["value"])
    return 0


def wait_for(what: str, done, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def test_timers_of_the_open_bundle_survive_a_savepoint(make_cfg, tmp_path):
    (tmp_path / "in").mkdir()
    rows = [f"{k},{1000 + 10 * i + j}" for i, k in enumerate(KEYS) for j in range(PER_KEY)]
    (tmp_path / "in" / "a.txt").write_text("\n".join(rows) + "\n")

    # 1. Every element read, no watermark, then stop with a savepoint.
    port = free_port()
    # (An open bundle also holds watermarks back: only this run keeps it open.)
    client = start(
        make_cfg,
        tmp_path,
        port,
        WatermarkStrategy.no_watermarks(),
        "job.bundle_size=1000000",
        "job.bundle_time_ms=3600000",
    )
    job_id = str(client.get_job_id())
    wait_for(
        "the file source never read every line",
        lambda: source_records_out(port, job_id) == len(rows),
    )
    assert lines(tmp_path / "fired") == []
    jvm = get_gateway().jvm
    savepoint = client._j_job_client.stopWithSavepoint(
        False,
        (tmp_path / "savepoints").as_uri(),
        jvm.org.apache.flink.core.execution.SavepointFormatType.CANONICAL,
    ).get()

    # 2. Restore; one more line moves the watermark past every timer.
    (tmp_path / "in" / "b.txt").write_text(f"end,{END_TS}\n")
    client = start(
        make_cfg,
        tmp_path,
        free_port(),
        WatermarkStrategy.for_monotonous_timestamps(),
        f"job.from_savepoint='{savepoint}'",
    )
    try:
        wait_for(
            f"keys whose restored state never fired (their timers were not in the savepoint): "
            f"{sorted(set(KEYS) - {x.split()[0] for x in lines(tmp_path / 'fired')})}",
            lambda: len(lines(tmp_path / "fired")) >= len(KEYS),
            timeout_s=90,
        )
    finally:
        client.cancel().result()
    fired = dict(line.split() for line in lines(tmp_path / "fired"))
    assert fired == {k: str(PER_KEY) for k in KEYS}


def test_every_keyed_stage_of_the_job_uses_the_checkpointed_timer_operators(make_cfg):
    """user-window, embed-items and trainer are built from flink_job/java's operators, and
    the stateless stages keep PyFlink's; the user windows themselves are Flink's."""
    from flink_job.job import build_job

    cfg = make_cfg("kafka.bounded=true")
    env = make_env(cfg)
    build_job(env, cfg, "127.0.0.1:9")
    ops = {}
    for t in env._j_stream_execution_environment.getTransformations():
        kind = t.getClass().getSimpleName()
        if kind in ("OneInputTransformation", "TwoInputTransformation"):
            factory = t.getOperatorFactory()
            if factory.getClass().getSimpleName() in (
                "SimpleOperatorFactory",
                "SimpleUdfStreamOperatorFactory",
            ):
                ops[t.getName()] = factory.getOperator().getClass().getName()
    assert ops["user-window"] == "rtrec.flink.CheckpointedTimersKeyedProcessOperator"
    assert ops["embed-items"] == "rtrec.flink.CheckpointedTimersKeyedProcessOperator"
    assert ops["trainer"] == "rtrec.flink.CheckpointedTimersKeyedCoProcessOperator"
    assert ops["parse-events"].startswith("org.apache.flink.")
    assert ops["user-window-events"].endswith("WindowOperator")
