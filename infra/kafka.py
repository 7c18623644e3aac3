"""An embedded single-node Apache Kafka broker (KRaft) for the demo, tests and CI.

It is the real broker (``kafka.Kafka`` from Maven Central jars), started on loopback
with free ports and its own data directory. Logs are kept in ``<workdir>/broker.log``
and are left behind (and their tail is shown) when the broker fails to start.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from infra.jars import SetupError, kafka_broker_libs

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 32 * 1024 * 1024


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise SetupError("Java is not on PATH; the embedded Kafka broker and Flink need Java 11+.")
    return java


@dataclass
class BrokerInfo:
    pid: int
    bootstrap: str
    workdir: str

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.__dict__))

    @staticmethod
    def load(path: Path) -> BrokerInfo:
        return BrokerInfo(**json.loads(path.read_text()))


class EmbeddedKafka:
    """Start/stop a real single-node KRaft broker bound to 127.0.0.1.

    Use as a context manager in tests, or ``start(detach=True)`` for `rtrec kafka up`.
    """

    def __init__(self, workdir: str | Path, heap_mb: int = 512) -> None:
        self.workdir = Path(workdir)
        self.heap_mb = heap_mb
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.bootstrap = ""

    def _write_config(self) -> Path:
        self.port, controller = free_port(), free_port()
        data = self.workdir / "data"
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller}",
            "listeners": f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{controller}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(data),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            # Flink's KafkaSink uses 1 h transactions by default.
            "transaction.max.timeout.ms": "3600000",
            "group.initial.rebalance.delay.ms": "0",
            "message.max.bytes": str(MAX_MESSAGE_BYTES),
            "replica.fetch.max.bytes": str(MAX_MESSAGE_BYTES),
            "auto.create.topics.enable": "false",
            # Record timestamps are event times, and replayed datasets are years old: with the
            # default 7-day time retention the broker would delete them minutes after the replay.
            "log.retention.ms": "-1",
            "log.flush.interval.ms": "1000",
        }
        cfg = self.workdir / "server.properties"
        cfg.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.workdir / "log4j2.properties").write_text(
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = file\n"
            "appender.file.type = File\n"
            "appender.file.name = file\n"
            f"appender.file.fileName = {self.workdir / 'broker.log'}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
        )
        return cfg

    def _classpath(self) -> str:
        return str(kafka_broker_libs()) + "/*"

    def start(self, timeout_s: float = 60.0, detach: bool = False) -> str:
        """Format storage, launch the broker, wait until it serves metadata; return bootstrap."""
        self.workdir = self.workdir.resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Every start is a fresh, empty broker: old data (say, from a crashed run) is dropped.
        shutil.rmtree(self.workdir / "data", ignore_errors=True)
        cfg = self._write_config()
        cp = self._classpath()
        java = _java()
        jvm_log = f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}"
        fmt = subprocess.run(
            [
                java,
                jvm_log,
                "-cp",
                cp,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                uuid.uuid4().hex[:22],
                "-c",
                str(cfg),
                "--ignore-formatted",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if fmt.returncode != 0:
            raise SetupError(
                f"formatting Kafka storage in {self.workdir} failed:\n{fmt.stderr[-2000:]}"
            )
        self._launch(detach)
        return self._await_ready(timeout_s, detach)

    def _launch(self, detach: bool = False) -> None:
        out = open(self.workdir / "stdout.log", "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [
                _java(),
                f"-Xmx{self.heap_mb}m",
                "-XX:+UseG1GC",
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp",
                self._classpath(),
                "kafka.Kafka",
                str(self.workdir / "server.properties"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=detach,
        )
        self.bootstrap = f"127.0.0.1:{self.port}"

    def _await_ready(self, timeout_s: float, detach: bool = False) -> str:
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SetupError(
                    f"Kafka broker exited with code {self.proc.returncode} during start; "
                    f"logs kept in {self.workdir}:\n{self.log_tail()}"
                )
            if _port_open(self.port) and self._metadata_ready():
                log.info(
                    "embedded Kafka broker ready at %s (pid %d, dir %s)",
                    self.bootstrap,
                    self.proc.pid,
                    self.workdir,
                )
                if detach:
                    BrokerInfo(self.proc.pid, self.bootstrap, str(self.workdir)).save(
                        self.workdir / "broker.json"
                    )
                return self.bootstrap
            time.sleep(0.3)
        self.stop(keep_logs=True)
        raise SetupError(
            f"Kafka broker did not become ready within {timeout_s:.0f}s; logs kept in "
            f"{self.workdir}:\n{self.log_tail()}"
        )

    def crash(self) -> None:
        """kill -9 the broker (the fault tests' broker crash; `recover` starts it again)."""
        if self.proc is None:
            raise RuntimeError("crash() needs a broker started by this object")
        self.proc.kill()
        self.proc.wait(timeout=10)

    def recover(self, timeout_s: float = 60.0) -> str:
        """Start a crashed broker again on the same ports and data; returns the bootstrap
        address once it serves metadata."""
        self._launch()
        return self._await_ready(timeout_s)

    def _metadata_ready(self) -> bool:
        from kafka import KafkaAdminClient

        try:
            admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
        except Exception:
            return False
        try:
            admin.list_topics()
            return True
        except Exception:
            return False
        finally:
            admin.close()

    def log_tail(self, lines: int = 40) -> str:
        chunks = []
        for name in ("stdout.log", "broker.log"):
            p = self.workdir / name
            if p.is_file():
                chunks.append(
                    f"--- {p} ---\n"
                    + "\n".join(p.read_text(errors="replace").splitlines()[-lines:])
                )
        return "\n".join(chunks)

    def stop(self, keep_logs: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        if not keep_logs:
            shutil.rmtree(self.workdir / "data", ignore_errors=True)

    def __enter__(self) -> EmbeddedKafka:
        self.start()
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.stop(keep_logs=exc_type is not None)


def stop_detached(workdir: str | Path) -> bool:
    """Stop a broker started with `rtrec kafka up`; True if one was running."""
    info_path = Path(workdir) / "broker.json"
    if not info_path.is_file():
        return False
    info = BrokerInfo.load(info_path)
    with contextlib.suppress(ProcessLookupError):
        os.kill(info.pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(info.pid, 0)
            time.sleep(0.2)
        os.kill(info.pid, signal.SIGKILL)
    info_path.unlink()
    return True


def detached_status(workdir: str | Path) -> BrokerInfo | None:
    info_path = Path(workdir) / "broker.json"
    if not info_path.is_file():
        return None
    info = BrokerInfo.load(info_path)
    try:
        os.kill(info.pid, 0)
    except ProcessLookupError:
        return None
    return info


def client_properties(
    bootstrap: str, properties: dict[str, str], client: type, **fixed: object
) -> dict[str, object]:
    """Dotted Kafka client properties as keyword arguments of the kafka-python ``client``
    class (KafkaAdminClient, KafkaProducer, KafkaConsumer), then ``fixed`` over them.

    ``kafka.properties`` configure the job's Flink clients too, so a property this client
    does not take (a consumer's ``max.partition.fetch.bytes`` for the admin client) is left
    out instead of failing; a numeric or boolean value given as text becomes the type of
    the client's default.
    """
    defaults = client.DEFAULT_CONFIG  # type: ignore[attr-defined]
    kw: dict[str, object] = {"bootstrap_servers": bootstrap}
    for k, v in properties.items():
        name = k.replace(".", "_")
        if name not in defaults:
            continue
        default = defaults[name]
        if isinstance(v, str) and isinstance(default, bool):
            kw[name] = v.strip().lower() == "true"
        elif isinstance(v, str) and isinstance(default, int | float):
            kw[name] = type(default)(v)
        else:
            kw[name] = v
    kw.update(fixed)
    return kw


def create_topics(
    bootstrap: str, topics: list[str], partitions: int = 1, properties: dict[str, str] | None = None
) -> None:
    """Create topics if missing (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    admin = KafkaAdminClient(**client_properties(bootstrap, properties or {}, KafkaAdminClient))
    try:
        existing = set(admin.list_topics())
        new = [
            NewTopic(
                name=t,
                num_partitions=partitions,
                replication_factor=1,
                topic_configs={"max.message.bytes": str(MAX_MESSAGE_BYTES)},
            )
            for t in topics
            if t not in existing
        ]
        if new:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics(new)
    finally:
        admin.close()


def _reader(bootstrap: str, properties: dict[str, str] | None, committed_only: bool):
    """A KafkaConsumer that reads whole topics (no group, no commits, fetches as large as
    the largest record: a model version)."""
    from kafka import KafkaConsumer

    return KafkaConsumer(
        **client_properties(
            bootstrap,
            properties or {},
            KafkaConsumer,
            enable_auto_commit=False,
            fetch_max_bytes=MAX_MESSAGE_BYTES * 2,
            max_partition_fetch_bytes=MAX_MESSAGE_BYTES * 2,
            isolation_level="read_committed" if committed_only else "read_uncommitted",
        )
    )


def read_topic(
    bootstrap: str,
    topic: str,
    committed_only: bool = False,
    properties: dict[str, str] | None = None,
    timeout_s: float = 60.0,
) -> list[bytes]:
    """Every record value currently in ``topic`` (all partitions, from the beginning).

    Reads until each partition's position reaches the end offset taken at the start (the
    last stable offset with ``committed_only``), so the result does not depend on timing.
    """
    from kafka import TopicPartition

    consumer = _reader(bootstrap, properties, committed_only)
    try:
        n = partition_count(bootstrap, topic, properties)
        tps = [TopicPartition(topic, p) for p in range(n)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        end = consumer.end_offsets(tps)
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < end[tp] for tp in tps):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} did not reach its end offsets in {timeout_s}s")
            for records in consumer.poll(timeout_ms=500).values():
                values.extend(r.value for r in records)
        return values
    finally:
        consumer.close()


def partition_count(bootstrap: str, topic: str, properties: dict[str, str] | None = None) -> int:
    """Partitions of ``topic`` as the controller knows them (a consumer's metadata can lag)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(**client_properties(bootstrap, properties or {}, KafkaAdminClient))
    try:
        desc = admin.describe_topics([topic])
    finally:
        admin.close()
    if not desc or desc[0].get("error_code", 0) != 0 or not desc[0].get("partitions"):
        raise ValueError(f"topic {topic!r} does not exist on {bootstrap}")
    return len(desc[0]["partitions"])


def read_time_range(
    bootstrap: str,
    topic: str,
    from_ts: int,
    to_ts: int,
    properties: dict[str, str] | None = None,
    timeout_s: float = 120.0,
) -> list[tuple[int, bytes, bytes]]:
    """(timestamp, key, value) of every record of ``topic`` with from_ts <= ts < to_ts,
    sorted by timestamp (all partitions)."""
    from kafka import TopicPartition

    consumer = _reader(bootstrap, properties, committed_only=True)
    try:
        n = partition_count(bootstrap, topic, properties)
        tps = [TopicPartition(topic, p) for p in range(n)]
        consumer.assign(tps)
        starts = consumer.offsets_for_times({tp: from_ts for tp in tps})
        end = consumer.end_offsets(tps)
        active = []
        for tp in tps:
            found = starts.get(tp)
            if found is None:  # nothing at or after from_ts in this partition
                continue
            consumer.seek(tp, found.offset)
            active.append(tp)
        out: list[tuple[int, bytes, bytes]] = []
        done: set[TopicPartition] = set()
        deadline = time.monotonic() + timeout_s
        while len(done) < len(active):
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} [{from_ts}, {to_ts}) timed out")
            for tp, records in consumer.poll(timeout_ms=500).items():
                for r in records:
                    if r.timestamp >= to_ts:
                        done.add(tp)
                        break
                    out.append((r.timestamp, r.key or b"", r.value))
            for tp in active:
                if consumer.position(tp) >= end[tp]:
                    done.add(tp)
            for tp in done:
                if tp in active:
                    consumer.pause(tp)
        out.sort(key=lambda x: x[0])
        return out
    finally:
        consumer.close()
