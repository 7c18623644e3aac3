"""Resolve the Java artifacts rtrec needs with Maven's CLI into a cache directory.

No pom.xml lives in the repository: single artifacts are fetched with
``dependency:copy``; the Kafka broker (which needs its transitive dependencies) is
resolved through a throw-away pom generated inside the cache directory.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

# flink-sql-connector-kafka releases per Flink minor version. PyFlink's Kafka wrapper
# expects the shaded class names of the fat "sql" connector jar.
KAFKA_CONNECTOR_FOR_FLINK = {"2.2": "5.0.0-2.2", "2.1": "4.0.1-2.0", "2.0": "4.0.1-2.0"}
KAFKA_BROKER_VERSION = "4.1.1"
LOG4J_VERSION = "2.24.3"
SLF4J_VERSION = "2.0.17"


class SetupError(RuntimeError):
    """A required tool or artifact is missing; the message says how to fix it."""


def cache_dir() -> Path:
    """``$RTREC_CACHE`` or ``~/.cache/rtrec``: jars and broker libs, shared by every checkout."""
    return Path(os.environ.get("RTREC_CACHE", Path.home() / ".cache" / "rtrec"))


def flink_minor_version() -> str:
    v = importlib.metadata.version("apache-flink")
    return ".".join(v.split(".")[:2])


def _mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise SetupError(
            "Maven ('mvn') is not on PATH; rtrec resolves its Java jars with it. "
            "Install Maven (e.g. `apt-get install maven`) and retry."
        )
    return mvn


def _run_tool(cmd: list[str], failed: str) -> None:
    """Run a build tool; a non-zero exit is a SetupError: ``failed``, the exit code and the
    tool's output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SetupError(
            f"{failed} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )


def _run_mvn(args: list[str], what: str) -> None:
    log.info("resolving %s with Maven (first run only, cached under %s)", what, cache_dir())
    _run_tool(
        [_mvn(), "-B", "-q", *args],
        f"Maven failed to resolve {what}. Is Maven Central reachable?",
    )


def kafka_connector_jar() -> Path:
    """Path to the flink-sql-connector-kafka fat jar matching the installed PyFlink."""
    minor = flink_minor_version()
    version = KAFKA_CONNECTOR_FOR_FLINK.get(minor)
    if version is None:
        raise SetupError(
            f"no known flink-sql-connector-kafka release for Flink {minor}; "
            f"supported: {', '.join(sorted(KAFKA_CONNECTOR_FOR_FLINK))}. "
            "Install apache-flink 2.2.x."
        )
    out = cache_dir() / "jars"
    jar = out / f"flink-sql-connector-kafka-{version}.jar"
    if not jar.is_file():
        out.mkdir(parents=True, exist_ok=True)
        _run_mvn(
            [
                "dependency:copy",
                f"-Dartifact=org.apache.flink:flink-sql-connector-kafka:{version}:jar",
                f"-DoutputDirectory={out}",
            ],
            f"flink-sql-connector-kafka {version}",
        )
    if not jar.is_file():
        raise SetupError(f"Maven reported success but {jar} is missing")
    return jar


_BROKER_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>rtrec.local</groupId><artifactId>kafka-broker-libs</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-server</artifactId>
      <version>{kafka}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId>
      <version>{slf4j}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId>
      <version>{log4j}</version></dependency>
  </dependencies>
</project>
"""


def kafka_broker_libs(version: str = KAFKA_BROKER_VERSION) -> Path:
    """Directory with the Apache Kafka broker jar and all its runtime dependencies."""
    libs = cache_dir() / f"kafka-{version}" / "libs"
    marker = libs / ".complete"
    if marker.is_file():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=libs.parent) as tmp:
        pom = Path(tmp) / "pom.xml"
        pom.write_text(_BROKER_POM.format(kafka=version, slf4j=SLF4J_VERSION, log4j=LOG4J_VERSION))
        staging = Path(tmp) / "libs"
        _run_mvn(
            ["-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={staging}"],
            f"the Apache Kafka {version} broker",
        )
        if libs.exists():
            shutil.rmtree(libs)
        staging.rename(libs)
    marker.write_text(version)
    return libs


JAVA_SOURCES = Path(__file__).resolve().parents[1] / "flink_job" / "java"


def operators_jar_name() -> str:
    """File name of the operator jar (flink_job/java) for the installed PyFlink: it changes
    with the sources and the Flink version, so a stale build is never picked up."""
    h = hashlib.sha256(importlib.metadata.version("apache-flink").encode())
    for src in sorted(JAVA_SOURCES.rglob("*.java")):
        h.update(src.relative_to(JAVA_SOURCES).as_posix().encode() + b"\0" + src.read_bytes())
    return f"rtrec-operators-{h.hexdigest()[:12]}.jar"


def _javac() -> str:
    home = os.environ.get("JAVA_HOME")
    candidates = [str(Path(home) / "bin" / "javac")] if home else []
    candidates.append(shutil.which("javac") or "")
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise SetupError(
        "a Java compiler ('javac', JDK 17) is needed once to build rtrec's operator jar "
        "(flink_job/java); install a JDK (e.g. `apt-get install openjdk-17-jdk-headless`) "
        "or put a prebuilt jar in job.jars_dir"
    )


def operators_jar(jars_dir: str = "") -> Path:
    """The jar of rtrec's Java operators (flink_job/java), compiled against the installed
    PyFlink on first use and cached. ``jars_dir``: where a prebuilt one may already be."""
    name = operators_jar_name()
    if jars_dir and (Path(jars_dir) / name).is_file():
        return Path(jars_dir) / name
    jar = cache_dir() / "jars" / name
    if jar.is_file():
        return jar
    import pyflink

    root = Path(pyflink.__file__).parent
    classpath = os.pathsep.join(
        [str(root / "lib" / "*"), *map(str, (root / "opt").glob("flink-python-*.jar"))]
    )
    sources = sorted(str(p) for p in JAVA_SOURCES.rglob("*.java"))
    if not sources:
        raise SetupError(f"no Java sources under {JAVA_SOURCES}: reinstall rtrec")
    jar.parent.mkdir(parents=True, exist_ok=True)
    log.info("compiling rtrec's operator jar (first run only) into %s", jar)
    with tempfile.TemporaryDirectory(dir=jar.parent) as tmp:
        classes = Path(tmp) / "classes"
        javac = [_javac(), "-nowarn", "--release", "17", "-cp", classpath, "-d", str(classes)]
        _run_tool(
            [*javac, *sources],
            f"javac failed to build {name} from {JAVA_SOURCES} against PyFlink in {root}",
        )
        staging = Path(tmp) / name
        with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
            for f in sorted(classes.rglob("*.class")):
                z.write(f, f.relative_to(classes).as_posix())
        staging.replace(jar)  # atomic: a concurrent build never sees half a jar
    return jar


def ensure_all() -> dict[str, Path]:
    """Resolve every Java artifact (used by `rtrec setup` and CI)."""
    return {
        "kafka_connector": kafka_connector_jar(),
        "kafka_broker_libs": kafka_broker_libs(),
        "operators": operators_jar(),
    }
