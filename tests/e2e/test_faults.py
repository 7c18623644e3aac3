"""Exactly-once training under failures, on a real standalone Flink cluster (JobManager +
2 TaskManagers from the pip package's scripts) fed from the embedded Kafka broker.

Deterministic mode makes the model a function of the input, so "exactly once" is checked
the strict way: the final model after a kill -9 is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from flink_job.config import load_config
from flink_job.savepoints import TERMINAL, cancel_job
from infra.cluster import StandaloneCluster
from infra.kafka import read_topic
from models.registry import list_versions, read_latest
from offline.stream import trainer_without_flink
from replay.datasets import records
from replay.producer import replay

EVENTS = 4000


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = StandaloneCluster(tmp_path_factory.mktemp("flink-cluster"), taskmanagers=2, slots=2)
    c.start()
    yield c
    c.stop()


def overrides(registry: Path, topic: str) -> list[str]:
    return [
        "kafka.bounded=true",
        f"kafka.events_topic='{topic}.events'",
        f"kafka.items_topic='{topic}.items'",
        f"kafka.dlq_topic='{topic}.dlq'",
        f"kafka.models_topic='{topic}.models'",
        "trainer.deterministic=true",
        "model.text_encoder='none'",
        "model.dim=16",
        f"replay.num_events={EVENTS}",
        "trainer.batch_size=50",
        "trainer.export_every_steps=10",
        "job.checkpoint_interval_ms=1000",
        "job.restart_attempts=5",
        f"job.checkpoint_dir='{registry.parent / 'checkpoints'}'",
        f"export.registry_dir='{registry}'",
    ]


def rtrec(*args: str) -> str:
    """Run the `rtrec` CLI (outside this process's PyFlink environment); its stdout."""
    env = {k: v for k, v in os.environ.items() if "PYFLINK" not in k}
    env.setdefault("RTREC_HMAC_KEY", "e2e-faults-test-key-0123456789")
    cmd = [sys.executable, "-m", "rtrec.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def submit(cluster: StandaloneCluster, bootstrap: str, ov: list[str], *extra: str) -> str:
    before = {j["jid"] for j in cluster.rest("/jobs/overview")["jobs"]}
    sets = [x for o in ov for x in ("--set", o)]
    rtrec("submit", "--jobmanager", cluster.address, "--bootstrap", bootstrap, *extra, *sets)
    new = [j["jid"] for j in cluster.rest("/jobs/overview")["jobs"] if j["jid"] not in before]
    assert len(new) == 1
    return new[0]


def state(cluster: StandaloneCluster, jid: str) -> str:
    return cluster.rest(f"/jobs/{jid}")["state"]


def wait_done(cluster: StandaloneCluster, jid: str, timeout_s: float = 300) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = state(cluster, jid)
        if s in ("FINISHED", "FAILED", "CANCELED"):
            return s
        time.sleep(0.5)
    raise TimeoutError(f"job {jid} still {s} after {timeout_s}s")


class Run:
    """What one job run left behind: registry versions, final manifest, the version names
    a read_committed consumer sees on the models topic, and the measured recovery."""

    def __init__(self, registry: Path, bootstrap: str, topic: str, recovery: float | None):
        self.names = list_versions(registry, "default")
        latest = read_latest(registry, "default")
        assert latest == self.names[-1], "LATEST must point at the highest version"
        self.manifest = json.loads((registry / "default" / latest / "manifest.json").read_text())
        records = read_topic(bootstrap, f"{topic}.models", committed_only=True)
        self.committed = [json.loads(r)["name"] for r in records]
        # The dead-letter topic is at-least-once: a replay after a failure may repeat records.
        # Records name their source topic, which differs per run.
        dlq = read_topic(bootstrap, f"{topic}.dlq")
        self.dead_letters = {r.replace(topic.encode(), b"<topic>") for r in dlq}
        self.recovery = recovery


def run(cluster, kafka, tmp_path, name: str, fault=None, parallelism: int = 2) -> Run:
    registry = tmp_path / name / "registry"
    topic = f"faults-{name}"
    ov = [*overrides(registry, topic), f"job.parallelism={parallelism}"]
    cfg = load_config(None, ov)
    stats = replay(cfg, kafka.bootstrap, progress=False)
    assert stats.events == EVENTS
    jid = submit(cluster, kafka.bootstrap, ov)
    recovery = fault(cluster, jid, registry) if fault else None
    assert wait_done(cluster, jid) == "FINISHED"
    return Run(registry, kafka.bootstrap, topic, recovery)


def wait_for_version(registry: Path, at_least: int = 1, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(list_versions(registry, "default")) < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} model versions in time"
        time.sleep(0.05)


@contextmanager
def held(cluster: StandaloneCluster, jid: str) -> Iterator[None]:
    """The job's Python workers are stopped (SIGSTOP) inside the block and continue after
    it. A bounded job can end within a second of its first version on a fast machine; held,
    it cannot end, so a fault struck inside the block strikes a running job."""
    pids = cluster.python_workers()
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        assert pids and state(cluster, jid) == "RUNNING", f"job {jid} ended before the fault"
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def failures(cluster: StandaloneCluster, jid: str) -> list[int]:
    """When (epoch ms) the job recorded each of its failures."""
    history = cluster.rest(f"/jobs/{jid}/exceptions")["exceptionHistory"]
    return [int(e["timestamp"]) for e in history["entries"]]


def await_resumed(
    cluster: StandaloneCluster, jid: str, t0: float, failover: bool, timeout_s: float = 120
) -> float:
    """Seconds from ``t0`` (the fault) until processing has resumed: a checkpoint triggered
    after the fault - with ``failover``, after the failure the job recorded for it - has
    completed (every task is running and past the failure), or the job has finished.

    A killed Python worker is noticed at its task's next bundle, so a checkpoint of a task
    with an empty bundle can complete after the kill but before the failover."""
    since_ms = (time.time() - (time.monotonic() - t0)) * 1000
    while time.monotonic() - t0 < timeout_s:
        failed = [t for t in failures(cluster, jid) if t >= since_ms] if failover else []
        if state(cluster, jid) == "FINISHED":
            assert failed or not failover, f"job {jid} finished and recorded no failure"
            return time.monotonic() - t0
        if failed or not failover:
            after_ms = max(failed, default=since_ms)
            latest = cluster.rest(f"/jobs/{jid}/checkpoints").get("latest", {}).get("completed")
            if latest and latest["trigger_timestamp"] > after_ms:
                return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"job {jid} did not resume within {timeout_s} s of the fault")


def trainer_worker(cluster: StandaloneCluster) -> int:
    """The trainer's Python worker: the only one that has loaded torch (the parsing and
    user-window stages never import it, tests/unit/test_layering.py, and these jobs embed
    no text)."""
    workers = cluster.python_workers()
    torch = [pid for pid in workers if b"libtorch" in Path(f"/proc/{pid}/maps").read_bytes()]
    assert len(torch) == 1, f"{len(torch)} of the Python workers {workers} have loaded torch"
    return torch[0]


def kill_taskmanager(cluster: StandaloneCluster, jid: str, registry: Path) -> float:
    """Once the job has published a version, kill -9 the trainer's TaskManager (and its
    Python workers) and start a fresh one in its place."""
    wait_for_version(registry)
    with held(cluster, jid):
        t0 = time.monotonic()
        i = [tm.pid for tm in cluster.tms].index(os.getpgid(trainer_worker(cluster)))
        cluster.kill_taskmanager(i)
    cluster.restart_taskmanager(i)
    return await_resumed(cluster, jid, t0, failover=True)


def kill_python_worker(cluster: StandaloneCluster, jid: str, registry: Path) -> float:
    """Once the job has published a version, kill -9 the trainer's Python worker process;
    the TaskManager JVMs stay up. (The other workers may have done all their work by then:
    their bounded input read, its last windows fired. Killing one of those fails nothing.)"""
    wait_for_version(registry)
    with held(cluster, jid):
        t0 = time.monotonic()
        os.kill(trainer_worker(cluster), signal.SIGKILL)
    return await_resumed(cluster, jid, t0, failover=True)


def restart_broker(kafka):
    def fault(cluster: StandaloneCluster, jid: str, registry: Path) -> float:
        """Once the job has published a version, kill -9 the Kafka broker and start it
        again (same ports, same log dirs) 2 s later."""
        wait_for_version(registry)
        with held(cluster, jid):
            t0 = time.monotonic()
            kafka.crash()
        time.sleep(2.0)
        kafka.recover()
        # The job's Kafka clients may ride out the outage without a failover.
        return await_resumed(cluster, jid, t0, failover=False)

    return fault


@pytest.fixture(scope="module")
def reference(cluster, kafka, tmp_path_factory) -> Run:
    """The uninterrupted run every faulty run must reproduce exactly."""
    return run(cluster, kafka, tmp_path_factory.mktemp("ref"), "reference")


def assert_same_model(got: Run, ref: Run) -> None:
    # The same records were rejected (none valid lost as late after the restart) ...
    assert got.dead_letters == ref.dead_letters
    # ... every other input event was trained on exactly once ...
    assert got.manifest["events_seen"] == ref.manifest["events_seen"] == EVENTS
    assert got.manifest["steps"] == ref.manifest["steps"]
    # ... and the final model is byte-identical to the uninterrupted run's (a version name
    # carries its content hash).
    assert got.names[-1] == ref.names[-1]
    # Deterministic mode re-makes the same versions after a recovery, so the registry holds
    # exactly the uninterrupted run's versions ...
    assert got.names == ref.names
    # ... while read_committed consumers of the transactional models topic see exactly the
    # uninterrupted run's versions, in order, once each.
    assert got.committed == ref.committed == ref.names


@pytest.mark.parametrize(
    "fault", ["taskmanager", "python-worker", "kafka-broker"], ids=lambda f: f"kill-{f}"
)
def test_fault_gives_the_same_model(cluster, kafka, tmp_path, reference, fault):
    action = {
        "taskmanager": kill_taskmanager,
        "python-worker": kill_python_worker,
        "kafka-broker": restart_broker(kafka),
    }[fault]
    got = run(cluster, kafka, tmp_path, fault, action)
    print(f"{fault} kill -> processing resumed: {got.recovery:.1f}s")
    assert_same_model(got, reference)


def savepoint(cluster: StandaloneCluster, jid: str, directory: Path, stop: bool) -> str:
    """`rtrec stop JOB --savepoint` (``stop``) or `rtrec savepoint JOB` once a checkpoint
    has completed (every task is running: a savepoint triggered while a task is still
    starting or finishing - the empty catalogue source - fails, and a stop-with-savepoint
    then fails the job over); returns the savepoint's location.

    The jobs are unbounded, so they cannot end on their own before the savepoint. (A
    bounded job's tasks decline every checkpoint once its sources have read their input -
    "task is closing" - so it has no savepoint after that.)"""
    deadline = time.monotonic() + 120
    while any(
        v["status"] != "FINISHED" and "Collection Source" in v["name"]
        for v in cluster.rest(f"/jobs/{jid}")["vertices"]
    ):
        assert time.monotonic() < deadline, "the empty catalogue source never finished"
        time.sleep(0.2)
    await_resumed(cluster, jid, time.monotonic(), failover=False)
    jm = ["--jobmanager", cluster.address, "--dir", str(directory)]
    out = rtrec("stop", jid, "--savepoint", *jm) if stop else rtrec("savepoint", jid, *jm)
    location = out.strip().splitlines()[-1]
    assert (Path(location.removeprefix("file:")) / "_metadata").is_file(), location
    if stop:
        assert wait_done(cluster, jid, 60) == "FINISHED"
    else:
        assert state(cluster, jid) == "RUNNING"
    return location


def test_rescale_1_2_1_keeps_the_exact_model(cluster, kafka, tmp_path):
    """Savepoint at parallelism 1, restore at 2 (user windows, trainer and sources all at 2),
    savepoint again, restore at 1 and take a savepoint that leaves the job running: every
    version published along the way is byte-identical to the uninterrupted run's version of
    the same number, so user histories, model and optimizer state all came through both
    rescales intact, and the last savepoint did not disturb the training.

    The input arrives in three parts, one per run, so each run has new events to learn
    from. The jobs are unbounded: a bounded KafkaSource restored from a savepoint never
    finishes (FLINK-31006, flink-connector-kafka 5.0.0). So the last run is compared up to
    the last version before the end of the input (the end-of-input version needs the final
    watermark), and the uninterrupted run is the job's offline replay
    (offline/stream.py, byte-identical to the job: tests/flink/test_metrics_parity.py).
    There is no catalogue topic: an unbounded, silent catalogue stream would hold the
    trainer's watermark back in deterministic mode.
    """
    registry = tmp_path / "registry"
    topic = "faults-rescale"
    base = [*overrides(registry, topic), "kafka.bounded=false", "kafka.items_topic=''"]
    cfg = load_config(None, base)
    events = [r for r in records(cfg.replay) if r.topic == "events"]
    expected = [v.name for v in trainer_without_flink(events, cfg).versions]
    assert len(expected) >= 6
    a, b = len(events) // 3, 2 * len(events) // 3
    savepoints = tmp_path / "savepoints"

    def published() -> list[str]:
        return list_versions(registry, "default")

    # 1. parallelism 1, the first third of the input; stop with a savepoint after a version.
    replay(cfg, kafka.bootstrap, progress=False, source=events[:a])
    jid = submit(cluster, kafka.bootstrap, [*base, "job.parallelism=1"])
    wait_for_version(registry, 1)
    sp = savepoint(cluster, jid, savepoints, stop=True)
    n1 = len(published())

    # 2. parallelism 2 from that savepoint, the second third; a new version, then stop.
    replay(cfg, kafka.bootstrap, progress=False, source=events[a:b])
    jid = submit(cluster, kafka.bootstrap, [*base, "job.parallelism=2"], "--from-savepoint", sp)
    wait_for_version(registry, n1 + 1)
    sp = savepoint(cluster, jid, savepoints, stop=True)
    n2 = len(published())

    # 3. back to parallelism 1, the rest; after a new version a savepoint that leaves the
    # job running; run until every version short of the final one.
    replay(cfg, kafka.bootstrap, progress=False, source=events[b:])
    jid = submit(cluster, kafka.bootstrap, [*base, "job.parallelism=1"], "--from-savepoint", sp)
    try:
        wait_for_version(registry, n2 + 1)
        savepoint(cluster, jid, savepoints, stop=False)
        wait_for_version(registry, len(expected) - 1, timeout_s=240)
    finally:
        if state(cluster, jid) not in TERMINAL:  # else its own failure is the one to see
            cancel_job(cluster.address, jid)
    got = published()
    print(f"rescale 1->2->1: versions {n1} at p1, {n2 - n1} at p2, {len(got) - n2} at p1 again")
    assert n2 > n1 >= 1 and len(got) > n2
    assert got == expected[: len(got)]
    # The transactional models topic holds the same versions, in order, once each (up to the
    # last checkpoint before the cancel).
    committed = [
        json.loads(r)["name"]
        for r in read_topic(kafka.bootstrap, f"{topic}.models", committed_only=True)
    ]
    assert len(committed) >= n2
    assert committed == got[: len(committed)]
