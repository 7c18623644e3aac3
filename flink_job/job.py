"""The rtrec job graph (docs/design.md, "Data flow").

Kafka events -> ParseEvents (-> DLQ) -> event-time watermarks -> key_by(user) -> tumbling
event-time windows (Flink's window operator; late events -> DLQ) -> user history
(UserWindows) -> key_by(model key) -> OnlineTrainer -> model versions ->
registry directory + Kafka ``models`` topic.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import NamedTuple

from pyflink.common import Configuration, Duration, Types, WatermarkStrategy
from pyflink.common.serialization import ByteArraySchema, SimpleStringSchema
from pyflink.common.watermark_strategy import TimestampAssigner
from pyflink.datastream import CheckpointingMode, StreamExecutionEnvironment
from pyflink.datastream.connectors.base import DeliveryGuarantee
from pyflink.datastream.connectors.kafka import (
    KafkaOffsetResetStrategy,
    KafkaOffsetsInitializer,
    KafkaRecordSerializationSchema,
    KafkaSink,
    KafkaSource,
)
from pyflink.datastream.externalized_checkpoint_retention import ExternalizedCheckpointRetention

from flink_job import pyflink_compat as compat
from flink_job.config import AppConfig, to_dict
from flink_job.keys import pseudonymisation_key
from flink_job.operators import key_by_field, use_checkpointed_timers, windows_by_field
from infra.jars import kafka_connector_jar, operators_jar
from models.text_encoder import configured_precision, encoder_off
from udfs.embed import EmbedItemTexts, bucket_key
from udfs.parse import DLQ_TAG, LateToDeadLetter, ParseControl, ParseEvents, ParseItems
from udfs.publish import PublishToRegistry, to_kafka_record
from udfs.records import EVENT_TYPE, ITEM_TYPE, SAMPLE_TYPE, VERSION_TYPE
from udfs.trainer import METRICS_TAG, OnlineTrainer
from udfs.user_window import UserWindows, UserWindowsWithControl

log = logging.getLogger(__name__)
# Must stay <= the broker's transaction.max.timeout.ms (15 min by default).
TRANSACTION_TIMEOUT_MS = 600_000


class HighWaterMarkTime(TimestampAssigner):
    """A record's timestamp = the event-time high-water mark its model has learned up to.

    Records emitted by the trainer's end-of-input timer would otherwise carry
    Long.MAX_VALUE - 1, which Kafka rejects as a record timestamp. ``field`` is the index of
    the JSON manifest in a version row; None for a metrics record (a JSON string).
    """

    def __init__(self, field: int | None) -> None:
        self.field = field

    def extract_timestamp(self, value, record_timestamp):
        doc = value if self.field is None else value[self.field]
        return int(json.loads(doc)["event_time_hwm_ms"])


def flink_settings(
    cfg: AppConfig, jar_uris: str, extra_conf: dict[str, str] | None = None
) -> dict[str, str]:
    """The Flink configuration of the job: options derived from ``cfg``, then
    ``job.flink`` verbatim, then ``extra_conf``. ``jar_uris``: ";"-separated jar URIs."""
    settings = {
        # Without these the Python workers may run another interpreter than the client.
        "python.executable": cfg.job.python_executable or sys.executable,
        "python.client.executable": cfg.job.python_executable or sys.executable,
        # Process mode only: in thread mode the trainer hangs (docs/pyflink-notes.md).
        "python.execution-mode": "process",
        "python.fn-execution.bundle.size": str(cfg.job.bundle_size),
        "python.fn-execution.bundle.time": str(cfg.job.bundle_time_ms),
        "python.state.cache-size": str(cfg.job.state_cache_size),
        "python.map-state.read-cache-size": str(cfg.job.state_cache_size),
        "python.map-state.write-cache-size": str(cfg.job.state_cache_size),
        "pipeline.jars": jar_uris,
        # Explicit restart strategy: with checkpointing on, the default retries forever.
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": str(cfg.job.restart_attempts),
        "restart-strategy.fixed-delay.delay": f"{cfg.job.restart_delay_ms} ms",
        "pipeline.name": cfg.job.name,
        # (Local mini-cluster; a real cluster takes it from its own config.) About a second
        # of data in flight instead of full network buffers: checkpoint barriers are not
        # queued behind the backlog the Kafka source reads ahead.
        "taskmanager.network.memory.buffer-debloat.enabled": "true",
    }
    slots = task_slots(cfg)
    if slots > cfg.job.parallelism:
        # Sizes a local mini-cluster (one TaskManager); a cluster's own setting wins there.
        settings["taskmanager.numberOfTaskSlots"] = str(slots)
    settings["state.backend.type"] = cfg.job.state_backend
    if cfg.job.checkpoint_interval_ms > 0:
        ckpt_dir = cfg.job.checkpoint_dir or str(Path(".rtrec/checkpoints").resolve())
        settings["execution.checkpointing.dir"] = (
            ckpt_dir if "://" in ckpt_dir else Path(ckpt_dir).resolve().as_uri()
        )
    if cfg.job.from_savepoint:
        settings["execution.savepoint.path"] = cfg.job.from_savepoint
    settings.update(cfg.job.flink)
    settings.update(extra_conf or {})
    return settings


def start_gateway(cfg: AppConfig) -> None:
    """Start PyFlink's JVM (in a local run, the mini-cluster's) with ``job.jvm_options``.

    PyFlink starts it on first use and takes extra options from ``JVM_ARGS`` (Flink's own
    variable: one set in the environment wins). A JVM already running, or the one of the
    `flink` CLI that submits the job, keeps its options.
    """
    if not compat.jvm_started() and cfg.job.jvm_options and "JVM_ARGS" not in os.environ:
        os.environ["JVM_ARGS"] = cfg.job.jvm_options
        try:
            compat.start_jvm()
        finally:
            del os.environ["JVM_ARGS"]  # not for the JVMs started later (Kafka, clusters)


def make_env(
    cfg: AppConfig, extra_conf: dict[str, str] | None = None
) -> StreamExecutionEnvironment:
    """A StreamExecutionEnvironment from ``cfg`` (a local mini-cluster unless submitted)."""
    start_gateway(cfg)
    jars_dir = cfg.job.jars_dir
    kafka = Path(jars_dir) / kafka_connector_jar().name if jars_dir else kafka_connector_jar()
    # The Kafka connector, and rtrec's operators (flink_job/operators.py: timers set by the
    # Python functions are part of every checkpoint).
    jar_uris = ";".join(j.resolve().as_uri() for j in (kafka, operators_jar(jars_dir)))
    compat.set_local_python_workers(cfg.job.local_python_workers == "process")
    conf = Configuration()
    for k, v in flink_settings(cfg, jar_uris, extra_conf).items():
        conf.set_string(k, v)
    env = StreamExecutionEnvironment.get_execution_environment(conf)
    use_checkpointed_timers()
    env.set_parallelism(cfg.job.parallelism)
    if cfg.job.checkpoint_interval_ms > 0:
        mode = (
            CheckpointingMode.EXACTLY_ONCE
            if cfg.job.checkpoint_mode == "exactly_once"
            else CheckpointingMode.AT_LEAST_ONCE
        )
        env.enable_checkpointing(cfg.job.checkpoint_interval_ms, mode)
        cc = env.get_checkpoint_config()
        cc.set_checkpoint_timeout(cfg.job.checkpoint_timeout_ms)
        cc.set_min_pause_between_checkpoints(cfg.job.checkpoint_min_pause_ms)
        cc.set_externalized_checkpoint_retention(
            ExternalizedCheckpointRetention.RETAIN_ON_CANCELLATION
            if cfg.job.retain_checkpoints
            else ExternalizedCheckpointRetention.DELETE_ON_CANCELLATION
        )
    return env


def _starting_offsets(cfg: AppConfig) -> KafkaOffsetsInitializer:
    if cfg.kafka.starting_offsets == "latest":
        return KafkaOffsetsInitializer.latest()
    if cfg.kafka.starting_offsets == "committed":
        return KafkaOffsetsInitializer.committed_offsets(KafkaOffsetResetStrategy.EARLIEST)
    return KafkaOffsetsInitializer.earliest()


def _sink(
    cfg: AppConfig, bootstrap: str, topic: str, exactly_once: bool, tx_prefix: str
) -> KafkaSink:
    records = (
        KafkaRecordSerializationSchema.builder()
        .set_topic(topic)
        .set_value_serialization_schema(SimpleStringSchema())
    )
    # Each sink subtask writes to one partition: the records of one model key come from
    # one trainer subtask, so a model's versions stay in order in one partition instead of
    # being spread round-robin.
    compat.use_fixed_partitioner(records)
    b = (
        KafkaSink.builder()
        .set_bootstrap_servers(bootstrap)
        .set_record_serializer(records.build())
        .set_property("max.request.size", str(32 * 1024 * 1024))
    )
    for k, v in cfg.kafka.properties.items():
        b = b.set_property(k, v)
    if exactly_once and cfg.job.checkpoint_interval_ms > 0:
        b = (
            b.set_delivery_guarantee(DeliveryGuarantee.EXACTLY_ONCE)
            .set_transactional_id_prefix(tx_prefix)
            .set_property("transaction.timeout.ms", str(TRANSACTION_TIMEOUT_MS))
        )
    else:
        b = b.set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
    return b.build()


def _kafka_bytes(env: StreamExecutionEnvironment, cfg: AppConfig, bootstrap: str, topic: str):
    """A stream of raw record values of ``topic``, with event-time watermarks.

    Event time = the Kafka record timestamp, with watermarks tracked per partition inside
    the source (a single watermark after the source would make every partition that is
    read a little behind the others "late"). Producers set it to the event's ts
    (`rtrec replay` does).
    """
    k = cfg.kafka
    b = (
        KafkaSource.builder()
        .set_bootstrap_servers(bootstrap)
        .set_topics(topic)
        .set_group_id(k.group_id)
        .set_starting_offsets(_starting_offsets(cfg))
        .set_value_only_deserializer(ByteArraySchema())
    )
    if k.properties:
        b = b.set_properties(dict(k.properties))
    if k.bounded:
        b = b.set_bounded(KafkaOffsetsInitializer.latest())
    watermarks = WatermarkStrategy.for_bounded_out_of_orderness(
        Duration.of_millis(cfg.job.out_of_orderness_ms)
    )
    # Idleness lets the watermark move on without a partition that is silent for a while
    # (processing time). Deterministic mode leaves it off: which events count as late would
    # then depend on timing (a partition stalled by a restart or a slow machine).
    name = {k.events_topic: "kafka-events", k.control_topic: "kafka-control"}.get(
        topic, "kafka-items"
    )
    idle_ms = cfg.job.idleness_ms if name == "kafka-events" else cfg.job.items_idleness_ms
    if name == "kafka-control":
        # Always: a control topic is silent nearly all the time, and without idleness its
        # watermark would hold back the user stage's (and, in deterministic mode, every
        # step of the trainer) until the first request.
        watermarks = watermarks.with_idleness(Duration.of_millis(max(idle_ms, 1000)))
    elif idle_ms > 0 and not cfg.trainer.deterministic:
        watermarks = watermarks.with_idleness(Duration.of_millis(idle_ms))
    return env.from_source(
        b.build(), watermarks, name, type_info=Types.PRIMITIVE_ARRAY(Types.BYTE())
    ).uid(name)


def embeds_items(cfg: AppConfig) -> bool:
    """Whether the graph has the item-text embedding stage (a text encoder and a catalogue
    topic)."""
    return not encoder_off(cfg.model.text_encoder) and bool(cfg.kafka.items_topic)


# The trainer and everything after it (version timestamps, registry and Kafka sinks) run
# at parallelism 1 whatever job.parallelism is: a job trains one model key, so every sample
# and catalogue record goes to one trainer subtask. More subtasks would only idle (a Python
# worker each to start, at every deploy and restart), and the sinks stay a forward chain of
# that subtask, which keeps a model's versions in order. (A job training several model
# keys, e.g. one per tenant or region, would use min(job.parallelism, number of keys).)
TRAINER_PARALLELISM = 1


def task_slots(cfg: AppConfig) -> int:
    """Task slots the job needs: ``job.parallelism`` per slot-sharing group of the
    parsing, user-window (and embedding) stages, and the trainer's one when it has a
    group of its own."""
    groups = {"default"}
    if embeds_items(cfg):
        groups.add(cfg.job.embed_slot_group or "default")
    slots = len(groups) * cfg.job.parallelism
    if (cfg.job.trainer_slot_group or "default") not in groups:
        slots += TRAINER_PARALLELISM
    return slots


def build_job(env: StreamExecutionEnvironment, cfg: AppConfig, bootstrap: str) -> None:
    """Add the whole rtrec graph to ``env``, reading from and writing to ``bootstrap``."""
    k = cfg.kafka
    raw = _kafka_bytes(env, cfg, bootstrap, k.events_topic)
    raw_items = _kafka_bytes(env, cfg, bootstrap, k.items_topic) if k.items_topic else None
    control = _kafka_bytes(env, cfg, bootstrap, k.control_topic) if k.control_topic else None

    versions, dead, metrics = build_graph(raw, cfg, raw_items, control)
    registry_sink(versions, cfg).print("model-version").uid("registry-log").name(
        "registry-log"
    ).set_parallelism(TRAINER_PARALLELISM)

    if cfg.export.publish_kafka:
        versions.map(to_kafka_record, output_type=Types.STRING()).uid(
            "models-record"
        ).set_parallelism(TRAINER_PARALLELISM).sink_to(
            _sink(
                cfg,
                bootstrap,
                k.models_topic,
                cfg.export.kafka_delivery == "exactly_once",
                f"{cfg.job.name}-models",
            )
        ).uid("models-sink").name("models-sink").set_parallelism(TRAINER_PARALLELISM)

    dead.sink_to(_sink(cfg, bootstrap, k.dlq_topic, exactly_once=False, tx_prefix="")).uid(
        "dlq-sink"
    ).name("dlq-sink")

    if k.metrics_topic:  # prequential metrics, one JSON record per trainer firing
        metrics.sink_to(
            _sink(cfg, bootstrap, k.metrics_topic, exactly_once=False, tx_prefix="")
        ).uid("metrics-sink").name("metrics-sink").set_parallelism(TRAINER_PARALLELISM)


class Pipeline(NamedTuple):
    """The job's output streams: model versions (VERSION_TYPE rows), dead letters (JSON)
    and prequential metrics records (JSON, models.metrics.metrics_record)."""

    versions: object
    dead: object
    metrics: object


def build_pipeline(raw, cfg: AppConfig, raw_items=None):
    """raw event bytes -> (model-version stream, dead-letter JSON stream).

    ``raw`` (events) and ``raw_items`` (catalogue records, optional) must carry event-time
    timestamps and watermarks (the Kafka sources do).
    Source-agnostic so tests can feed a collection instead of Kafka.
    """
    p = build_graph(raw, cfg, raw_items)
    return p.versions, p.dead


def build_graph(raw, cfg: AppConfig, raw_items=None, raw_control=None) -> Pipeline:
    """Like :func:`build_pipeline`, with the trainer's metrics side output too.
    ``raw_control``: the control topic's raw records (forget requests), if any."""
    k = cfg.kafka
    parsed = (
        raw.process(ParseEvents(k.events_topic, pseudonymisation_key(cfg)), output_type=EVENT_TYPE)
        .uid("parse-events")
        .name("parse-events")
    )
    dead = parsed.get_side_output(DLQ_TAG)

    # Flink's window operator keeps each user's open windows in the JVM; Python sees each
    # closed window once (flink_job.operators.windows_by_field).
    windows, late_events = windows_by_field(parsed, 1, cfg.job.window_ms, "user-window-events")
    stage = (cfg.user, cfg.model.history_length, cfg.job.model_key)
    if raw_control is None:
        samples = windows.process(
            UserWindows(*stage, cfg.job.malloc_thresholds, k.events_topic),
            output_type=SAMPLE_TYPE,
        )
    else:
        # Forget requests, pseudonymised as the events are, reach the user stage directly:
        # not through the windows, where one older than the watermark would be late.
        control = (
            raw_control.process(
                ParseControl(k.control_topic, pseudonymisation_key(cfg)), output_type=EVENT_TYPE
            )
            .uid("parse-control")
            .name("parse-control")
        )
        dead = dead.union(control.get_side_output(DLQ_TAG))
        samples = windows.connect(key_by_field(control, 1)).process(
            UserWindowsWithControl(*stage, cfg.job.malloc_thresholds, k.events_topic),
            output_type=SAMPLE_TYPE,
        )
    samples = samples.uid("user-window").name("user-window")
    if cfg.user.max_events_per_window > 0:
        dead = dead.union(samples.get_side_output(DLQ_TAG))
    late = (
        late_events.map(LateToDeadLetter(k.events_topic), output_type=Types.STRING())
        .uid("late-to-dlq")
        .name("late-to-dlq")
    )

    if raw_items is not None:
        items = (
            raw_items.process(ParseItems(k.items_topic, cfg.job.model_key), output_type=ITEM_TYPE)
            .uid("parse-items")
            .name("parse-items")
        )
        dead = dead.union(items.get_side_output(DLQ_TAG))
        if not encoder_off(cfg.model.text_encoder):
            # The transformer runs here, beside the trainer, not inside it.
            items = (
                items.key_by(bucket_key, key_type=Types.STRING())
                .process(
                    EmbedItemTexts(
                        cfg.model,
                        cfg.trainer.torch_threads,
                        configured_precision(cfg.model, cfg.trainer.deterministic),
                        cfg.job.malloc_thresholds,
                    ),
                    output_type=ITEM_TYPE,
                )
                .uid("embed-items")
                .name("embed-items")
            )
            if cfg.job.embed_slot_group:
                items = items.slot_sharing_group(cfg.job.embed_slot_group)
    else:  # no catalogue topic: an empty, immediately finished second input
        items = raw.get_execution_environment().from_collection([], type_info=ITEM_TYPE)
    trainer = (
        key_by_field(samples, 0)  # model key
        .connect(key_by_field(items, 0))
        .process(
            OnlineTrainer(
                cfg.model,
                cfg.trainer,
                cfg.export.top_k,
                _public_config(cfg),
                cfg.export.tensorboard_dir,
                cfg.job.malloc_thresholds,
            ),
            output_type=VERSION_TYPE,
        )
        .uid("trainer")
        .name("trainer")
        .set_parallelism(TRAINER_PARALLELISM)
    )
    if cfg.job.trainer_slot_group:
        trainer = trainer.slot_sharing_group(cfg.job.trainer_slot_group)
    metrics = (
        trainer.get_side_output(METRICS_TAG)
        .assign_timestamps_and_watermarks(
            WatermarkStrategy.no_watermarks().with_timestamp_assigner(HighWaterMarkTime(None))
        )
        .uid("metrics-time")
        .name("metrics-time")
    )
    versions = (
        trainer.assign_timestamps_and_watermarks(
            WatermarkStrategy.no_watermarks().with_timestamp_assigner(HighWaterMarkTime(2))
        )
        .uid("version-time")
        .name("version-time")
    )
    _after_trainer(metrics, trainer)
    _after_trainer(versions, trainer)

    return Pipeline(versions, dead.union(late), metrics)


def _after_trainer(stream, trainer) -> None:
    """Run every operator between ``trainer`` and ``stream`` at the trainer's parallelism.

    PyFlink's assign_timestamps_and_watermarks with a Python assigner adds operators of its
    own (a Python "Extract-Timestamp" process and Flink's watermark operator) that take the
    job's parallelism: behind a single trainer subtask they would spread its versions
    round-robin over several subtasks and could reorder them before the sinks.
    """
    compat.set_parallelism_between(trainer, stream, TRAINER_PARALLELISM)


def registry_sink(versions, cfg: AppConfig):
    """Publish every version into the registry directory; returns one JSON status per version."""
    return (
        versions.map(
            PublishToRegistry(str(Path(cfg.export.registry_dir).resolve())),
            output_type=Types.STRING(),
        )
        .uid("registry-sink")
        .name("registry-sink")
        .set_parallelism(TRAINER_PARALLELISM)
    )


def _public_config(cfg: AppConfig) -> dict:
    """The config recorded in manifests, without secrets."""
    d = to_dict(cfg)
    d["kafka"]["properties"] = {
        key: ("***" if any(s in key for s in ("password", "secret", "sasl.jaas")) else v)
        for key, v in d["kafka"]["properties"].items()
    }
    return d
