"""A real Flink standalone cluster on loopback, from the pip package's own scripts.

JobManager + N TaskManagers as child processes (``start-foreground``), with a generated
configuration directory, free ports and logs under ``workdir``. Used by the end-to-end tests
(fault tolerance: kill -9 a TaskManager; rescaling through savepoints) and by the recovery
and state benchmarks; rtrec has no command that starts one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.jars import SetupError
from infra.kafka import free_port

log = logging.getLogger(__name__)

# The default of ``job.jvm_options``, for small TaskManagers whose JVM work is light next to
# the Python workers': C1 JIT only (C2 compiles for the first minute of every JVM, on the
# cores the Python workers need) and the serial GC (no concurrent GC threads). Large
# TaskManagers do better with the JVM's own defaults ("").
JVM_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


class StandaloneCluster:
    def __init__(
        self,
        workdir: str | Path,
        taskmanagers: int = 2,
        slots: int = 2,
        jvm_options: str = JVM_OPTIONS,
    ) -> None:
        """``jvm_options``: ``env.java.opts.all`` of its JVMs (``job.jvm_options``)."""
        self.workdir = Path(workdir).resolve()
        self.jvm_options = jvm_options
        self.n_tm = taskmanagers
        self.slots = slots
        import pyflink

        self.home = Path(pyflink.__file__).parent
        self.jm: subprocess.Popen[bytes] | None = None
        self.tms: list[subprocess.Popen[bytes]] = []
        self.rest_port = 0

    def _conf(self) -> dict[str, str]:
        self.rest_port = free_port()
        return {
            "jobmanager.rpc.address": "127.0.0.1",
            "jobmanager.rpc.port": str(free_port()),
            "jobmanager.bind-host": "127.0.0.1",
            "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1",
            "rest.port": str(self.rest_port),
            "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.host": "127.0.0.1",
            "taskmanager.numberOfTaskSlots": str(self.slots),
            "jobmanager.memory.process.size": "1024m",
            "taskmanager.memory.process.size": "2048m",
            "taskmanager.memory.managed.fraction": "0.3",
            "python.executable": sys.executable,
            "python.client.executable": sys.executable,
            "heartbeat.timeout": "8000",
            "heartbeat.interval": "1000",
            "parallelism.default": "1",
            # Keep about a second of data in flight instead of full network buffers, so a
            # checkpoint or stop-with-savepoint barrier is not queued behind the backlog.
            "taskmanager.network.memory.buffer-debloat.enabled": "true",
            **({"env.java.opts.all": self.jvm_options} if self.jvm_options else {}),
        }

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if "PYFLINK" not in k}
        env.update(
            FLINK_LIB_DIR=str(self.workdir / "lib"),
            FLINK_CONF_DIR=str(self.workdir / "conf"),
            FLINK_LOG_DIR=str(self.workdir / "log"),
            FLINK_PID_DIR=str(self.workdir / "pid"),
        )
        return env

    def _spawn(self, script: str, name: str) -> subprocess.Popen[bytes]:
        out = open(self.workdir / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 - child owns it
        return subprocess.Popen(
            ["bash", str(self.home / "bin" / script), "start-foreground"],
            env=self._env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self, timeout_s: float = 90.0) -> str:
        """Start JobManager + TaskManagers; returns the REST address host:port."""
        for d in ("conf", "log", "pid", "lib"):
            (self.workdir / d).mkdir(parents=True, exist_ok=True)
        # The pip package keeps flink-python in opt/; a cluster running Python operators
        # needs it on its classpath, so the cluster gets its own lib dir of links.
        for jar in [
            *(self.home / "lib").glob("*.jar"),
            *(self.home / "opt").glob("flink-python*.jar"),
        ]:
            link = self.workdir / "lib" / jar.name
            if not link.exists():
                link.symlink_to(jar)
        conf = self._conf()
        (self.workdir / "conf" / "config.yaml").write_text(
            "".join(f"{k}: {v}\n" for k, v in conf.items())
        )
        # start-foreground logs through log4j-console.properties: to stdout, kept in log/.
        (self.workdir / "conf" / "log4j-console.properties").write_text(
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.console.ref = ConsoleAppender\n"
            "appender.console.name = ConsoleAppender\n"
            "appender.console.type = CONSOLE\n"
            "appender.console.layout.type = PatternLayout\n"
            "appender.console.layout.pattern = %d{HH:mm:ss,SSS} %-5p %c{1} - %m%n\n"
        )
        self.jm = self._spawn("jobmanager.sh", "jobmanager")
        for i in range(self.n_tm):
            self.tms.append(self._spawn("taskmanager.sh", f"taskmanager-{i}"))
        if self._registered(self.n_tm, timeout_s):
            log.info("standalone Flink cluster ready at %s", self.address)
            return self.address
        self.stop()
        raise SetupError(
            f"Flink cluster did not start within {timeout_s:.0f}s; logs in {self.workdir / 'log'}"
        )

    def _registered(self, n: int, timeout_s: float) -> bool:
        """Wait until ``n`` TaskManagers have registered with the JobManager (False: not
        within ``timeout_s``, or the JobManager exited)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if self.overview()["taskmanagers"] >= n:
                    return True
            except OSError:
                pass
            if self.jm is None or self.jm.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.rest_port}"

    def rest(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://{self.address}{path}", timeout=5) as r:
            return json.loads(r.read())

    def overview(self) -> dict:
        return self.rest("/overview")

    def kill_taskmanager(self, i: int = 0) -> int:
        """kill -9 TaskManager i (its whole process group, Python workers included)."""
        p = self.tms[i]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        return p.pid

    def python_workers(self) -> list[int]:
        """PIDs of the Python worker processes (Beam SDK harnesses) of the TaskManagers."""
        groups = {p.pid for p in self.tms if p.poll() is None}
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"fn_execution" in cmd and os.getpgid(int(d.name)) in groups:
                    pids.append(int(d.name))
            except (OSError, ProcessLookupError):
                continue  # exited while we looked
        return sorted(pids)

    def add_taskmanager(self, timeout_s: float = 90.0) -> int:
        """Start one more TaskManager (e.g. a spare: a job restarts on its free slots at
        once when another TaskManager is lost) and wait until it has registered; returns
        its index."""
        self.tms.append(self._spawn("taskmanager.sh", f"taskmanager-{len(self.tms)}"))
        if not self._registered(len(self.tms), timeout_s):
            raise SetupError(
                f"TaskManager {len(self.tms) - 1} did not register within {timeout_s:.0f}s; "
                f"logs in {self.workdir / 'log'}"
            )
        return len(self.tms) - 1

    def restart_taskmanager(self, i: int = 0) -> None:
        self.tms[i] = self._spawn("taskmanager.sh", f"taskmanager-{i}-r")

    def stop(self) -> None:
        for p in [*self.tms, *([self.jm] if self.jm else [])]:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                    p.wait(timeout=20)
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        self.tms, self.jm = [], None

    def __enter__(self) -> StandaloneCluster:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
