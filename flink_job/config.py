"""Typed configuration: frozen dataclasses loaded from TOML, overridable from the CLI.

Rules users rely on:
- unknown sections or keys are errors (a typo never silently falls back to a default);
- values are type-checked against the dataclass annotations;
- ``kafka.properties`` passes Kafka client properties through with their dotted names
  (``"security.protocol" = "SASL_SSL"``) to every Kafka client the job creates;
- CLI overrides use ``--set section.key=value`` (TOML value syntax, bare strings allowed).
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra.cluster import JVM_OPTIONS
from models.config import ModelConfig, TrainerConfig, UserStageConfig
from models.text_encoder import PRECISIONS


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message says where and what to do."""


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka connection and topics. An empty bootstrap_servers means "start the embedded broker"."""

    bootstrap_servers: str = ""
    events_topic: str = "events"
    items_topic: str = "items"
    dlq_topic: str = "events.dlq"
    models_topic: str = "models"
    # Prequential metrics, one JSON record per trainer firing ("" = not published).
    metrics_topic: str = "metrics"
    group_id: str = "rtrec"
    partitions: int = 2
    # "earliest" | "latest" | "committed": where the job starts when it has no checkpoint.
    starting_offsets: str = "earliest"
    # Stop at the offsets that were the latest when the job started (replay-and-finish runs).
    bounded: bool = False
    # Passed verbatim to every Kafka client (source, sinks, admin, replay producer).
    properties: dict[str, str] = field(default_factory=dict)

    def topics(self) -> list[str]:
        """Every topic the job reads or writes (what `kafka up` and replay create)."""
        named = [self.events_topic, self.items_topic, self.dlq_topic, self.models_topic]
        return [t for t in [*named, self.metrics_topic] if t]


@dataclass(frozen=True)
class JobConfig:
    """Flink-level settings of the job graph."""

    name: str = "rtrec-online-trainer"
    parallelism: int = 1
    model_key: str = "default"
    # Key of the HMAC that pseudonymises user ids before anything is stored; "" disables it.
    # Change it per deployment (and keep it stable: user state is keyed by the result).
    hmac_key: str = "rtrec-change-me"
    # "process" (Python worker processes). "thread" (embedded, one GIL) is refused: the
    # trainer hangs in it with PyFlink 2.2 (see validate()).
    python_mode: str = "process"
    # Where a local run's (mini-cluster's) Python workers run: "process" = worker processes,
    # one per task slot, each with its own GIL; "loopback" = threads of the rtrec process
    # (PyFlink's local default: starts faster, but every Python operator shares one GIL).
    # A cluster always uses processes.
    local_python_workers: str = "process"
    # Slot-sharing group of the trainer (and the sinks after it): its own slots, hence its own
    # Python worker process and GIL, instead of sharing them with parsing and user windows;
    # "" = share. The job then needs parallelism + 1 slots (the trainer runs at parallelism
    # 1; a local run sizes its mini-cluster so; a cluster needs them). With local worker
    # processes: +31% events/s at p1 (README "Optimisations").
    trainer_slot_group: str = "trainer"
    # Slot-sharing group of the item-text embedding stage (udfs/embed.py; only with a text
    # encoder). "" = the parsing stages' slots (default: on 2 cores a third Python worker per
    # subtask was slower); a name gives it its own Python workers, for machines with cores
    # to spare, and the job then needs another parallelism's worth of slots.
    embed_slot_group: str = ""
    window_ms: int = 1000
    out_of_orderness_ms: int = 5000
    # Source idleness (processing time): a partition silent this long stops holding the
    # watermark back. Off (0) for events: while the job catches up on a backlog, a partition
    # read behind the others counts as idle and its events arrive "late" (a 10k-event replay
    # lost 46% of them to the dead-letter topic with 5 s); turn it on only if some event
    # partitions stay empty. The catalogue topic is often silent for long, and its records
    # are never late-dropped, so it has idleness on.
    idleness_ms: int = 0
    items_idleness_ms: int = 5000
    checkpoint_interval_ms: int = 10_000  # 0 disables checkpointing
    checkpoint_mode: str = "exactly_once"  # or "at_least_once"
    checkpoint_timeout_ms: int = 600_000
    checkpoint_min_pause_ms: int = 0
    # Where checkpoints go (a path or URI; "" = .rtrec/checkpoints); kept after cancellation
    # when retain_checkpoints, so a job can be restarted from the latest one.
    checkpoint_dir: str = ""
    retain_checkpoints: bool = True
    state_backend: str = "hashmap"  # or "rocksdb" (state larger than memory)
    # Start from this savepoint / retained checkpoint ("" = fresh start or Kafka offsets).
    from_savepoint: str = ""
    restart_attempts: int = 3
    restart_delay_ms: int = 1000
    # Python bundles: elements (or ms, whichever first) per round trip to a Python worker.
    # Each bundle ends in a blocking flush of its stage. Catching up on a backlog, the
    # parse stage fills 5000 elements several times a second and the flushes starve the
    # trainer: 20000 sustained ~1.6x the events/s of 5000 (README "Optimisations"). A live
    # stream below capacity is flushed by bundle_time_ms long before the size is reached,
    # so latency is unchanged; a checkpoint waits for the bundle in flight, and a slow
    # stream waits up to bundle_time_ms per Python stage (configs/low-latency.toml: 20 ms).
    bundle_size: int = 20_000
    bundle_time_ms: int = 1000
    # Entries (keys, or map entries) of keyed state each Python worker keeps cached
    # (python.state.cache-size and the map-state read/write caches). A read that misses is
    # a round trip to the JVM; more users or items than this per worker thrash it.
    state_cache_size: int = 100_000
    # Any other Flink option, with its dotted name (applied last, on the local mini-cluster
    # and in the submitted job's configuration).
    flink: dict[str, str] = field(default_factory=dict)
    # Directory holding the connector jar on the machine that builds the job graph ("" = cache).
    jars_dir: str = ""
    # Python interpreter of the workers ("" = the interpreter running rtrec).
    python_executable: str = ""
    # Options of the JVMs rtrec starts itself: the local mini-cluster of `rtrec run` and
    # infra.cluster.StandaloneCluster (docker-compose.yml sets the same). A cluster you
    # submit to keeps its own env.java.opts.*. The default suits small TaskManagers (see
    # infra.cluster.JVM_OPTIONS); "" = the JVM's defaults (better on large TaskManagers).
    jvm_options: str = JVM_OPTIONS
    # Fixed glibc malloc thresholds in the Python workers (udfs/malloc.py): the learner's
    # and the text encoder's large tensors are reused from the heap instead of mapped and
    # page-faulted in again at every step. No effect without glibc.
    malloc_thresholds: bool = True


@dataclass(frozen=True)
class ExportConfig:
    """Where and how model versions are published."""

    registry_dir: str = ".rtrec/registry"
    top_k: int = 50
    publish_kafka: bool = True
    # "exactly_once" (transactional, visible to read_committed consumers at checkpoints)
    # or "at_least_once".
    kafka_delivery: str = "exactly_once"
    # TensorBoard event files of the prequential metrics, <dir>/<model key> ("" = off).
    tensorboard_dir: str = ""


@dataclass(frozen=True)
class ReplayConfig:
    """What `rtrec replay` / the demo writes into Kafka."""

    dataset: str = "synthetic"  # "synthetic" or a MovieLens directory (ratings.csv + movies.csv)
    num_users: int = 300
    num_items: int = 400
    num_events: int = 6000
    new_items_midstream: int = 40
    malformed_fraction: float = 0.01
    drift_every_events: int = 2000
    drift_fraction: float = 0.2  # share of the users whose taste moves at each drift
    drift_reshuffle: bool = False  # at each drift also reshuffle every topic's item order
    seed: int = 7
    max_events: int = 0  # 0 = all (MovieLens)


@dataclass(frozen=True)
class AppConfig:
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    job: JobConfig = field(default_factory=JobConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    user: UserStageConfig = field(default_factory=UserStageConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    replay: ReplayConfig = field(default_factory=ReplayConfig)


def _check_type(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` coerced to the annotated type or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, bool) and tp is not bool:
            raise ConfigError(f"{where}: expected {tp.__name__}, got boolean {value!r}")
        if not isinstance(value, tp):
            raise ConfigError(
                f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}"
            )
        return value
    if origin is tuple:
        (et, _) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected an array, got {type(value).__name__}")
        return tuple(_check_type(v, et, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return {str(k): _check_type(v, vt, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} does not match {tp}")
    raise ConfigError(f"{where}: unsupported config type {tp}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(f'{where}.{k}' if where else k for k in unknown)}; "
            f"valid keys{' in [' + where + ']' if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        tp = hints[name]
        key = f"{where}.{name}" if where else name
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"[{key}] must be a table")
            kwargs[name] = _build(tp, value, key)  # type: ignore[arg-type]
        else:
            kwargs[name] = _check_type(value, tp, key)
    return cls(**kwargs)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    # kafka.properties.<dotted.name>=value keeps the dotted Kafka property name intact.
    if len(parts) > 2 and parts[0] == "kafka" and parts[1] == "properties":
        parts = ["kafka", "properties", ".".join(parts[2:])]
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare strings: --set kafka.bootstrap_servers=host:9092
    return parts, value


def _merge(base: dict[str, Any], parts: list[str], value: Any) -> None:
    node = base
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {p} is not a table")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Load defaults <- TOML file <- ``--set`` overrides, validating every key and type."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file {p} does not exist (pass --config PATH to an existing TOML)"
            )
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    for ov in overrides or []:
        parts, value = _parse_override(ov)
        _merge(data, parts, value)
    cfg = _build(AppConfig, data, "")
    validate(cfg)
    return cfg


def replace_values(cfg: AppConfig, values: dict[str, Any]) -> AppConfig:
    """``cfg`` with ``{"section.key": value}`` replaced, checked like a loaded config
    (unknown keys, types and cross-field rules raise ConfigError naming the key)."""
    data = to_dict(cfg)
    for dotted, value in values.items():
        parts = dotted.split(".")
        if len(parts) != 2:
            raise ConfigError(f"{dotted!r}: expected section.key (e.g. trainer.lr)")
        section = parts[0]
        if section not in data:
            raise ConfigError(
                f"unknown section {section!r} in {dotted!r}; sections: {', '.join(sorted(data))}"
            )
        _merge(data, parts, value)
    new = _build(AppConfig, data, "")
    validate(new)
    return new


def validate(cfg: AppConfig) -> None:
    """Cross-field checks with messages that say what to change."""
    if cfg.job.python_mode not in ("process", "thread"):
        raise ConfigError(
            f"job.python_mode must be 'process' or 'thread', got {cfg.job.python_mode!r}"
        )
    if cfg.job.python_mode == "thread":
        # Measured with PyFlink 2.2.1: in the embedded interpreter (PEMJA) the trainer's
        # first torch call never returns, and state TTL tries to start a py4j gateway.
        raise ConfigError(
            "job.python_mode='thread' hangs this job: in PyFlink 2.2's embedded Python "
            "(PEMJA) the trainer's first torch call never returns and state TTL tries to "
            "start a py4j gateway; use job.python_mode='process'"
        )
    if cfg.job.local_python_workers not in ("process", "loopback"):
        raise ConfigError(
            "job.local_python_workers must be 'process' or 'loopback'; "
            f"got {cfg.job.local_python_workers!r}"
        )
    if cfg.job.checkpoint_mode not in ("exactly_once", "at_least_once"):
        raise ConfigError(
            "job.checkpoint_mode must be exactly_once or at_least_once; "
            f"got {cfg.job.checkpoint_mode!r}"
        )
    if cfg.job.state_backend not in ("hashmap", "rocksdb"):
        raise ConfigError(
            f"job.state_backend must be hashmap or rocksdb; got {cfg.job.state_backend!r}"
        )
    if cfg.trainer.loss not in ("sampled_softmax", "bpr", "adaptive_softmax"):
        raise ConfigError(
            "trainer.loss must be sampled_softmax, bpr or adaptive_softmax; "
            f"got {cfg.trainer.loss!r}"
        )
    if cfg.trainer.optimizer not in ("adagrad", "sgd", "adam"):
        raise ConfigError(
            f"trainer.optimizer must be one of adagrad, sgd, adam; got {cfg.trainer.optimizer!r}"
        )
    if cfg.kafka.starting_offsets not in ("earliest", "latest", "committed"):
        raise ConfigError(
            "kafka.starting_offsets must be earliest, latest or committed; "
            f"got {cfg.kafka.starting_offsets!r}"
        )
    if cfg.export.kafka_delivery not in ("exactly_once", "at_least_once"):
        raise ConfigError(
            "export.kafka_delivery must be exactly_once or at_least_once; "
            f"got {cfg.export.kafka_delivery!r}"
        )
    if cfg.kafka.bounded and cfg.job.from_savepoint:
        # flink-sql-connector-kafka 5.0.0: a restored enumerator that finds no new partitions
        # never tells its readers that no splits are left (FLINK-31006), so the job would
        # read to the end and then wait forever.
        raise ConfigError(
            "kafka.bounded=true cannot restore from a savepoint (job.from_savepoint / "
            "--from-savepoint): the Kafka connector never ends a restored bounded source "
            "(FLINK-31006), so the job would hang at the end of the input. Restore with "
            "kafka.bounded=false and stop the job with `rtrec stop JOB --savepoint` once it "
            "has caught up"
        )
    if cfg.model.text_precision not in PRECISIONS:
        raise ConfigError(
            f"model.text_precision must be one of {', '.join(PRECISIONS)}; "
            f"got {cfg.model.text_precision!r}"
        )
    if cfg.model.transition_pairs > cfg.model.history_length:
        # The transition memory counts pairs among the history the user tower reads.
        raise ConfigError(
            f"model.transition_pairs ({cfg.model.transition_pairs}) must be <= "
            f"model.history_length ({cfg.model.history_length}): a positive's transitions "
            "are counted from the newest history items the model reads; lower "
            "transition_pairs or raise history_length"
        )
    for name, v in (
        ("trainer.batch_size", cfg.trainer.batch_size),
        ("model.dim", cfg.model.dim),
        ("model.history_length", cfg.model.history_length),
        ("job.parallelism", cfg.job.parallelism),
        ("export.top_k", cfg.export.top_k),
        ("trainer.export_every_steps", cfg.trainer.export_every_steps),
        ("trainer.catchup_factor", cfg.trainer.catchup_factor),
        ("job.window_ms", cfg.job.window_ms),
    ):
        if v <= 0:
            raise ConfigError(f"{name} must be > 0, got {v}")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: AppConfig) -> str:
    """Render the resolved config as TOML (what `rtrec config` prints)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return repr(v)

    lines: list[str] = []
    for section, values in to_dict(cfg).items():
        lines.append(f"[{section}]")
        tables = []
        for k, v in values.items():
            if isinstance(v, dict):
                tables.append((k, v))
            else:
                lines.append(f"{k} = {fmt(v)}")
        for k, v in tables:
            inner = ", ".join(f'"{kk}" = {fmt(vv)}' for kk, vv in v.items())
            lines.append(f"{k} = {{ {inner} }}")
        lines.append("")
    return "\n".join(lines)
