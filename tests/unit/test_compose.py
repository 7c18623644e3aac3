"""docker-compose.yml and the Dockerfile agree with the code they deploy.

Pure Python: the files are parsed, the `rtrec` command lines are parsed with the real CLI
parser, and names, ports and versions are compared with flink_job's constants. Nothing
here needs Docker or a JVM.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from flink_job.config import KafkaConfig, load_config
from infra import jars
from infra.kafka import MAX_MESSAGE_BYTES
from rtrec.cli import build_parser, cmd_replay, cmd_serve, cmd_submit

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
RTREC_SERVICES = ("jobmanager", "taskmanager", "submit", "replay", "serving")


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command")
    assert cmd, "service has no command"
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _rtrec_args(service: dict[str, Any]):
    """Parse ``rtrec ...`` with the CLI's own parser (argparse exits on unknown flags)."""
    cmd = _command(service)
    assert cmd[0] == "rtrec", f"expected an `rtrec` command, got {cmd}"
    try:
        return build_parser().parse_args(cmd[1:])
    except SystemExit as e:  # argparse's way of rejecting the command line
        pytest.fail(f"`{' '.join(cmd)}` is rejected by rtrec.cli.build_parser() (exit {e.code})")


def _published_container_ports(service: dict[str, Any]) -> set[int]:
    """Container-side ports of ``ports:`` (short "HOST:CONTAINER" or long syntax)."""
    out = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            out.add(int(p["target"]))
        else:
            out.add(int(str(p).split("/")[0].rsplit(":", 1)[-1]))
    return out


def _published_pairs(service: dict[str, Any]) -> set[tuple[int, int]]:
    pairs = set()
    for p in service.get("ports", []):
        if isinstance(p, dict):
            pairs.add((int(p.get("published", p["target"])), int(p["target"])))
        else:
            parts = str(p).split("/")[0].split(":")
            pairs.add((int(parts[-2]) if len(parts) > 1 else int(parts[-1]), int(parts[-1])))
    return pairs


def _mount_targets(service: dict[str, Any]) -> dict[str, str]:
    """Volume mounts as {container path: source}."""
    out = {}
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out[v["target"]] = v.get("source", "")
        else:
            src, target = str(v).split(":")[:2]
            out[target] = src
    return out


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {str(k): str(v) for k, v in env.items()}


def _flink_properties(service: dict[str, Any]) -> dict[str, str]:
    props = {}
    for line in _environment(service).get("FLINK_PROPERTIES", "").splitlines():
        if line.strip():
            key, value = line.split(":", 1)
            props[key.strip()] = value.strip()
    return props


def _host_port(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def _image_tag(image: str) -> str:
    assert ":" in image, f"image {image!r} has no explicit tag"
    return image.rsplit(":", 1)[1]


def _advertised_bootstrap(services: dict[str, dict[str, Any]]) -> str:
    listeners = _environment(services["kafka"])["KAFKA_ADVERTISED_LISTENERS"].split(",")
    plaintext = [x for x in listeners if x.startswith("PLAINTEXT://")]
    assert len(plaintext) == 1, listeners
    return plaintext[0].removeprefix("PLAINTEXT://")


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = pending + line
        pending = ""
        word, _, rest = full.partition(" ")
        instructions.append((word.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return instructions


def _substitute(text: str, variables: dict[str, str]) -> str:
    """Expand $NAME / ${NAME} of build args; shell variables are left as they are."""

    def repl(m: re.Match[str]) -> str:
        return variables.get(m.group(1) or m.group(2), m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def _docker_args() -> dict[str, str]:
    """Default values of every ``ARG NAME=value`` (before and after FROM)."""
    args = {}
    for instr, rest in _dockerfile():
        if instr == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name.strip()] = value.strip().strip('"')
    return args


def _installed_flink_minor() -> str:
    return ".".join(importlib.metadata.version("apache-flink").split(".")[:2])


def _module_constant(path: Path, name: str) -> Any:
    """A module-level constant read from source (avoids importing PyFlink)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} not found in {path}")


# ------------------------------------------------------------------------------- Kafka
def test_topics_service_creates_exactly_the_configured_topics(services):
    script = " ".join(_command(services["topics"]))
    created = re.findall(r"--topic\s+(\S+)", script)
    k = KafkaConfig()
    expected = {k.events_topic, k.items_topic, k.dlq_topic, k.models_topic, k.metrics_topic}
    assert set(created) == expected
    assert len(created) == len(expected), f"a topic is created twice: {created}"
    assert script.count("--create") == len(expected)
    assert script.count("--if-not-exists") == len(expected)
    partitions = {int(p) for p in re.findall(r"--partitions\s+(\d+)", script)}
    assert partitions == {k.partitions}


def test_topics_service_uses_the_broker(services):
    topics = services["topics"]
    assert topics["image"] == services["kafka"]["image"]
    assert "kafka" in topics.get("depends_on", {})
    script = " ".join(_command(topics))
    servers = set(re.findall(r"--bootstrap-server\s+(\S+)", script))
    assert servers == {_advertised_bootstrap(services)}


def test_kafka_image_matches_the_embedded_broker_version(services):
    assert _image_tag(services["kafka"]["image"]) == jars.KAFKA_BROKER_VERSION


def test_kafka_is_a_single_kraft_node_reachable_by_service_name(services):
    kafka = services["kafka"]
    env = _environment(kafka)
    host, port = _host_port(_advertised_bootstrap(services))
    assert host == "kafka" and host in services
    assert f"PLAINTEXT://:{port}" in env["KAFKA_LISTENERS"].split(",")
    assert port in _published_container_ports(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    controller = next(x for x in env["KAFKA_LISTENERS"].split(",") if x.startswith("CONTROLLER://"))
    assert (
        env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node_id}@kafka:{controller.rsplit(':', 1)[1]}"
    )
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"


def test_kafka_limits_fit_the_job(services):
    env = _environment(services["kafka"])
    assert int(env["KAFKA_MESSAGE_MAX_BYTES"]) >= MAX_MESSAGE_BYTES
    tx_timeout = _module_constant(ROOT / "flink_job" / "job.py", "TRANSACTION_TIMEOUT_MS")
    assert int(env["KAFKA_TRANSACTION_MAX_TIMEOUT_MS"]) >= tx_timeout


# ------------------------------------------------------------------------- rtrec commands
def test_submit_command_parses_and_targets_the_cluster(services):
    args = _rtrec_args(services["submit"])
    assert args.command == "submit"
    assert args.func is cmd_submit
    host, port = _host_port(args.jobmanager)
    assert host == "jobmanager" and host in services
    assert port == 8081
    assert port in _published_container_ports(services["jobmanager"])
    assert args.bootstrap == _advertised_bootstrap(services)


def test_submit_overrides_are_valid_config_and_match_the_registry_volume(services):
    args = _rtrec_args(services["submit"])
    cfg = load_config(args.config, args.overrides)
    registry = cfg.export.registry_dir
    tm_mounts = _mount_targets(services["taskmanager"])
    assert registry in tm_mounts, "the TaskManagers write the registry: mount it there"
    serving_mounts = _mount_targets(services["serving"])
    assert serving_mounts.get(registry) == tm_mounts[registry], "serving must see the same volume"


def test_registry_is_a_named_volume(compose, services):
    source = _mount_targets(services["taskmanager"])["/registry"]
    assert source in (compose.get("volumes") or {})


def test_submit_waits_for_topics_and_the_cluster(services):
    deps = services["submit"]["depends_on"]
    assert {"jobmanager", "taskmanager", "topics"} <= set(deps)
    assert deps["topics"]["condition"] == "service_completed_successfully"


def test_replay_command_parses_and_uses_the_advertised_broker(services):
    replay = services["replay"]
    args = _rtrec_args(replay)
    assert args.command == "replay" and args.func is cmd_replay
    assert args.bootstrap == _advertised_bootstrap(services)
    assert "demo" in replay.get("profiles", [])


def test_serving_command_parses_and_its_port_is_published(services):
    serving = services["serving"]
    args = _rtrec_args(serving)
    assert args.command == "serve" and args.func is cmd_serve
    assert args.host == "0.0.0.0", "bind all interfaces or the published port is unreachable"
    assert (args.port, args.port) in _published_pairs(serving)
    assert args.registry in _mount_targets(serving)


# --------------------------------------------------------------------------- Flink cluster
def test_rtrec_services_share_the_dockerfile_image(services):
    image = services["jobmanager"]["image"]
    assert services["jobmanager"].get("build") in (".", {"context": "."})
    for name in RTREC_SERVICES:
        assert services[name]["image"] == image, name
    assert _command(services["jobmanager"]) == ["jobmanager"]
    assert _command(services["taskmanager"]) == ["taskmanager"]


def test_flink_properties_point_at_the_image_python(services):
    venv = dict(
        kv.split("=", 1)
        for instr, rest in _dockerfile()
        if instr == "ENV"
        for kv in shlex.split(rest)
        if "=" in kv
    )["VIRTUAL_ENV"]
    python = f"{venv}/bin/python"
    for name in ("jobmanager", "taskmanager"):
        props = _flink_properties(services[name])
        assert props["jobmanager.rpc.address"] == "jobmanager", name
        assert props["python.executable"] == python, name
        assert props["python.client.executable"] == python, name
    assert int(_flink_properties(services["taskmanager"])["taskmanager.numberOfTaskSlots"]) >= 1


def test_flink_jvms_get_rtrecs_jvm_options(services):
    """The compose cluster's JVMs run with the options the local runs and tests use."""
    from flink_job.config import JobConfig

    for name in ("jobmanager", "taskmanager"):
        assert _flink_properties(services[name])["env.java.opts.all"] == JobConfig.jvm_options


# ------------------------------------------------------------------------------ Dockerfile
def test_dockerfile_flink_version_matches_installed_pyflink():
    args = _docker_args()
    froms = [_substitute(rest, args) for instr, rest in _dockerfile() if instr == "FROM"]
    assert len(froms) == 1, froms
    assert "$" not in froms[0], f"base image has an unresolved variable: {froms[0]!r}"
    m = re.fullmatch(r"flink:(\d+)\.(\d+)\.(\d+)-scala_2\.12-java17", froms[0].split()[0])
    assert m, f"unexpected base image {froms[0]!r}"
    assert f"{m.group(1)}.{m.group(2)}" == _installed_flink_minor()
    # The PyFlink client in the image is pinned to the base image's exact Flink release.
    runs = " ".join(_substitute(rest, args) for instr, rest in _dockerfile() if instr == "RUN")
    pins = set(re.findall(r"apache-flink==([\d.]+)", runs))
    assert pins == {".".join(m.groups())}


def test_dockerfile_connector_matches_jars_module():
    args = _docker_args()
    version = args["KAFKA_CONNECTOR_VERSION"]
    assert version == jars.KAFKA_CONNECTOR_FOR_FLINK[_installed_flink_minor()]
    runs = " ".join(_substitute(rest, args) for instr, rest in _dockerfile() if instr == "RUN")
    assert (
        f"https://repo1.maven.org/maven2/org/apache/flink/flink-sql-connector-kafka/{version}/"
        in runs
    )
    assert f"flink-sql-connector-kafka-{version}.jar" in runs


def test_dockerfile_puts_the_connector_where_rtrec_looks():
    envs = [rest for instr, rest in _dockerfile() if instr == "ENV"]
    assert any(re.match(r"RTREC_CACHE=\S+", e) for e in envs), "RTREC_CACHE must be set"
    runs = " ".join(rest for instr, rest in _dockerfile() if instr == "RUN")
    assert "$RTREC_CACHE/jars" in runs
    assert "/opt/flink/lib/" in runs


def test_dockerfile_builds_the_operator_jar_after_installing_rtrec():
    """The operator jar is compiled in the image (its JRE has no javac), after `pip install .`
    (which ships flink_job/java) and with RTREC_CACHE set, where make_env looks for it."""
    steps = [(instr, rest) for instr, rest in _dockerfile()]
    install = next(
        i
        for i, (ins, rest) in enumerate(steps)
        if ins == "RUN" and re.search(r"pip install (-c \S+ )?\.", rest)
    )
    build = next(i for i, (ins, rest) in enumerate(steps) if "operators_jar()" in rest)
    cache = next(
        i for i, (ins, rest) in enumerate(steps) if ins == "ENV" and "RTREC_CACHE=" in rest
    )
    assert cache < install < build
    assert "JAVA_HOME=" in steps[build][1]
