"""Typed configuration: frozen dataclasses loaded from TOML, overridable from the CLI.

Rules users rely on:
- unknown sections or keys are errors (a typo never silently falls back to a default);
- values are type-checked against the dataclass annotations;
- ``kafka.properties`` passes Kafka client properties through with their dotted names
  (``"security.protocol" = "SASL_SSL"``) to every Kafka client the job creates;
- CLI overrides use ``--set section.key=value`` (TOML value syntax, bare strings allowed);
- ``--config`` takes a TOML file or the name of a profile in flink_job/profiles/.

Each key carries its meaning in its field metadata (``models.config.setting``), from which
``python -m rtrec.config_docs`` generates docs/configuration.md.
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
from models.config import (
    HISTORY_SOURCES,
    ModelConfig,
    TrainerConfig,
    UserStageConfig,
    meta,
    setting,
)
from models.text_encoder import PRECISIONS


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message says where and what to do."""


@dataclass(frozen=True)
class KafkaConfig:
    """Kafka connection and topics."""

    bootstrap_servers: str = setting(
        "",
        'Kafka brokers, host:port[,host:port...] ("" = rtrec\'s embedded broker: the one '
        "`rtrec kafka up` started, or one started for the command).",
    )
    events_topic: str = setting("events", "Topic of the user events the job learns from.")
    items_topic: str = setting("items", "Topic of the item catalogue (texts, categories).")
    dlq_topic: str = setting("events.dlq", "Dead-letter topic: malformed and late events.")
    models_topic: str = setting(
        "models", "Topic the model versions are published to (with export.publish_kafka)."
    )
    control_topic: str = setting(
        "",
        'Topic of control records: {"action": "forget", "user_id": ..., "ts": ...} deletes '
        'a user\'s data in the user stage (docs/operations.md); "" = no control input.',
    )
    metrics_topic: str = setting(
        "metrics",
        'Topic of the prequential metrics, one JSON record per trainer firing ("" = not '
        "published).",
    )
    group_id: str = setting("rtrec", "Consumer group id of the job's Kafka sources.")
    partitions: int = setting(2, "Partitions of the topics rtrec creates (kafka up, replay).")
    starting_offsets: str = setting(
        "earliest",
        'Where the job starts reading when it has no checkpoint: "earliest", "latest" or '
        '"committed" (the group\'s committed offsets).',
    )
    bounded: bool = setting(
        False,
        "Stop at the offsets that were the latest when the job started (replay-and-finish "
        "runs); cannot be combined with job.from_savepoint.",
    )
    properties: dict[str, str] = field(
        default_factory=dict,
        metadata=meta(
            "Kafka client properties with their dotted names, passed verbatim to every Kafka "
            "client (source, sinks, admin, replay producer).",
        ),
    )

    def topics(self) -> list[str]:
        """Every topic the job reads or writes (what `kafka up` and replay create)."""
        named = [self.events_topic, self.items_topic, self.dlq_topic, self.models_topic]
        return [t for t in [*named, self.metrics_topic, self.control_topic] if t]


@dataclass(frozen=True)
class JobConfig:
    """Flink-level settings of the job graph: parallelism, windows and watermarks,
    checkpoints, restarts and the Python workers."""

    name: str = setting("rtrec-online-trainer", "Flink job name (pipeline.name).")
    parallelism: int = setting(
        1, "Parallelism of the sources, parsing, user windows and item embedding."
    )
    model_key: str = setting(
        "default", "Key of the model this job trains; registry and manifests name it."
    )
    # Keep the key stable: user state is keyed by the pseudonymised id (flink_job/keys.py).
    pseudonymise: bool = setting(
        True, "Replace user ids by a keyed HMAC before anything is stored (false = raw ids)."
    )
    hmac_key_file: str = setting(
        "",
        "File holding the pseudonymisation key. Empty: the RTREC_HMAC_KEY environment "
        "variable, else (local runs only) a random key generated once in .rtrec/hmac.key.",
    )
    window_ms: int = setting(1000, "Event-time length of a user window (tumbling).")
    out_of_orderness_ms: int = setting(
        5000,
        "Bounded out-of-orderness of the event watermark; events further behind the newest "
        "one of their partition go to the dead-letter topic as late.",
    )
    # Off for events: while the job catches up on a backlog, a partition read behind the
    # others would count as idle and its events would arrive late. The catalogue topic is
    # often silent for long, and its records are never late-dropped.
    idleness_ms: int = setting(
        0,
        "Source idleness of the events (processing time): a partition silent this long "
        "stops holding the watermark back (0 = off; set it only if some event partitions "
        "stay empty).",
    )
    items_idleness_ms: int = setting(5000, "Source idleness of the catalogue topic.")
    checkpoint_interval_ms: int = setting(
        10_000, "Checkpoint interval (0 disables checkpointing, and with it exactly-once)."
    )
    checkpoint_mode: str = setting("exactly_once", '"exactly_once" or "at_least_once".')
    checkpoint_timeout_ms: int = setting(600_000, "A checkpoint not done by then fails.")
    checkpoint_min_pause_ms: int = setting(0, "Least time between two checkpoints.")
    checkpoint_dir: str = setting(
        "", 'Where checkpoints go, a path or URI ("" = .rtrec/checkpoints).'
    )
    retain_checkpoints: bool = setting(
        True,
        "Keep the latest checkpoint when the job is cancelled, so it can be restarted from it.",
    )
    state_backend: str = setting("hashmap", '"hashmap" or "rocksdb" (state larger than memory).')
    from_savepoint: str = setting(
        "",
        'Start from this savepoint or retained checkpoint ("" = fresh start or committed '
        "Kafka offsets).",
    )
    restart_attempts: int = setting(3, "Attempts of the fixed-delay restart strategy.")
    restart_delay_ms: int = setting(1000, "Delay between two restart attempts.")
    flink: dict[str, str] = field(
        default_factory=dict,
        metadata=meta(
            "Any other Flink option with its dotted name, applied last (on the local "
            "mini-cluster and in a submitted job's configuration).",
        ),
    )
    jars_dir: str = setting(
        "",
        'Directory holding the connector jar on the machine that builds the job graph ("" = '
        "rtrec's jar cache).",
    )
    python_executable: str = setting(
        "", 'Python interpreter of the workers ("" = the interpreter running rtrec).'
    )
    # Performance only: placement of the Python stages, Python bundles and state caches,
    # and the JVM and malloc tuning; none changes what the job computes.
    # "loopback" is PyFlink's local default: it starts faster, but all Python operators
    # share one GIL.
    local_python_workers: str = setting(
        "process",
        'Where a local run\'s Python workers run: "process" (worker processes, one per task '
        'slot, each with its own GIL) or "loopback" (threads of the rtrec process). A '
        "cluster always uses processes.",
        perf=True,
    )
    # Its own slots give the trainer its own Python worker process and GIL instead of
    # sharing them with parsing and the user windows.
    trainer_slot_group: str = setting(
        "trainer",
        'Slot-sharing group of the trainer and the sinks after it ("" = share). The job then '
        "needs parallelism + 1 slots, the trainer running at parallelism 1 (a local run "
        "sizes its mini-cluster so).",
        perf=True,
    )
    # Default: sharing, as a third Python worker per subtask competes for the cores of a
    # small machine.
    embed_slot_group: str = setting(
        "",
        'Slot-sharing group of the item-text embedding stage, with a text encoder ("" = the '
        "parsing stages' slots); a name gives it its own Python workers and needs another "
        "parallelism's worth of slots.",
        perf=True,
    )
    # Each bundle ends in a blocking flush of its stage: catching up on a backlog, small
    # bundles flush several times a second and starve the trainer. A live stream below
    # capacity is flushed by bundle_time_ms long before the size is reached, so a large
    # size adds no latency.
    bundle_size: int = setting(
        20_000, "Elements per Python bundle (round trip to a Python worker).", perf=True
    )
    bundle_time_ms: int = setting(
        1000,
        "Longest a Python bundle waits to fill: what a slow stream waits per Python stage, "
        "and what a checkpoint may wait for the bundle in flight.",
        perf=True,
    )
    # A read that misses is a round trip to the JVM.
    state_cache_size: int = setting(
        100_000,
        "Keyed-state entries each Python worker caches (python.state.cache-size and the "
        "map-state read/write caches); more users or items per worker thrash it.",
        perf=True,
    )
    # The default suits small TaskManagers (infra.cluster.JVM_OPTIONS; docker-compose.yml
    # sets the same).
    jvm_options: str = setting(
        JVM_OPTIONS,
        "Options of the JVMs rtrec starts itself: the local mini-cluster and "
        'infra.cluster.StandaloneCluster ("" = the JVM\'s defaults, better on large '
        "TaskManagers). A cluster you submit to keeps its own env.java.opts.*.",
        perf=True,
    )
    # The learner's and the text encoder's large tensors are then reused from the heap
    # instead of mapped and page-faulted in again at every step.
    malloc_thresholds: bool = setting(
        True,
        "Fixed glibc malloc thresholds in the Python workers (udfs/malloc.py; no effect "
        "without glibc).",
        perf=True,
    )


@dataclass(frozen=True)
class ExportConfig:
    """Where and how model versions are published."""

    registry_dir: str = setting(
        ".rtrec/registry", "Model registry: a directory per model key, one per version in it."
    )
    top_k: int = setting(50, "Items each exported model returns per query (its top-K).")
    publish_kafka: bool = setting(True, "Also publish each version to kafka.models_topic.")
    kafka_delivery: str = setting(
        "exactly_once",
        '"exactly_once" (transactional: visible to read_committed consumers at checkpoints) '
        'or "at_least_once".',
    )
    tensorboard_dir: str = setting(
        "",
        "Directory of TensorBoard event files of the prequential metrics, one subdirectory "
        'per model key ("" = off).',
    )


@dataclass(frozen=True)
class ReplayConfig:
    """What `rtrec replay` and the demo write into Kafka."""

    dataset: str = setting(
        "synthetic", '"synthetic" or a MovieLens directory (ratings.csv + movies.csv).'
    )
    num_users: int = setting(300, "Synthetic users.")
    num_items: int = setting(400, "Synthetic items, new_items_midstream of them included.")
    num_events: int = setting(6000, "Synthetic events.")
    new_items_midstream: int = setting(
        40, "Synthetic items that first appear in the catalogue during the stream."
    )
    malformed_fraction: float = setting(
        0.01, "Share of malformed events (they go to the dead-letter topic)."
    )
    drift_every_events: int = setting(
        2000, "Synthetic events between two taste drifts (0 = no drift)."
    )
    drift_fraction: float = setting(0.2, "Share of the users whose taste moves at each drift.")
    drift_reshuffle: bool = setting(False, "At each drift also reshuffle every topic's item order.")
    seed: int = setting(7, "Seed of the synthetic stream.")
    max_events: int = setting(0, "Events replayed from MovieLens (0 = all).")
    permute_ids: bool = setting(
        False,
        "Replace every item id (and event id) by a random opaque one, so that nothing can "
        "learn from how a dataset numbers its items (an evaluation guard).",
    )
    shuffle_ties: bool = setting(
        False,
        "Shuffle the order of events with equal timestamps (files often list a burst in id "
        "order, which leaks; an evaluation guard).",
    )
    guard_seed: int = setting(0, "Seed of permute_ids and shuffle_ties.")


@dataclass(frozen=True)
class AppConfig:
    """The job's whole configuration, one section per TOML table."""

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


PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


def profile_names() -> list[str]:
    """The ready profiles (flink_job/profiles/NAME.toml) that ``--config NAME`` loads."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def config_path(path: str | Path) -> Path:
    """The TOML file ``--config`` names: an existing file, else a profile by its bare name
    (``low-latency`` or ``low-latency.toml``); ConfigError naming the profiles otherwise."""
    p = Path(path)
    if p.is_file():
        return p
    bare = p.name == str(path)  # no directory part
    if bare:
        profile = PROFILES_DIR / (p.name if p.suffix == ".toml" else f"{p.name}.toml")
        if profile.is_file():
            return profile
    what = "is neither a file nor a profile" if bare else "does not exist"
    raise ConfigError(
        f"config file {p} {what}: pass --config PATH to an existing TOML or the name of a "
        f"profile ({', '.join(profile_names())})"
    )


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Load defaults <- TOML file or profile (see :func:`config_path`) <- ``--set``
    overrides, validating every key and type."""
    data: dict[str, Any] = {}
    if path is not None:
        p = config_path(path)
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p} is not valid TOML: {e}") from e
    for ov in overrides or []:
        parts, value = _parse_override(ov)
        _merge(data, parts, value)
    if isinstance(data.get("job"), dict) and "hmac_key" in data["job"]:
        raise ConfigError(
            "job.hmac_key is not read: a key in the configuration shows in `rtrec config` "
            "and wherever the configuration goes; put it in a file and set "
            "job.hmac_key_file = PATH (mode 0600), or set RTREC_HMAC_KEY "
            "(job.pseudonymise = false turns pseudonymisation off)"
        )
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
    if cfg.trainer.loss not in ("sampled_softmax", "full_softmax", "bpr", "adaptive_softmax"):
        raise ConfigError(
            "trainer.loss must be sampled_softmax, full_softmax, bpr or adaptive_softmax; "
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
        # A restored Kafka enumerator that finds no new partitions never tells its readers
        # that no splits are left (FLINK-31006), so the job would read to the end and then
        # wait forever.
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
    if cfg.model.history_source not in HISTORY_SOURCES:
        raise ConfigError(
            f"model.history_source must be one of {', '.join(HISTORY_SOURCES)}; "
            f"got {cfg.model.history_source!r}"
        )
    if not 0.0 < cfg.model.transition_decay <= 1.0:
        raise ConfigError(
            f"model.transition_decay must be in (0, 1]; got {cfg.model.transition_decay} "
            "(1 = every counted pair weighs the same)"
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


def toml_value(v: Any) -> str:
    """One value as TOML (strings quoted, tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        inner = ", ".join(f"{toml_value(str(k))} = {toml_value(x)}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    return repr(v)


def to_toml(cfg: AppConfig) -> str:
    """Render the resolved config as TOML (what `rtrec config` prints)."""
    fmt = toml_value

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
