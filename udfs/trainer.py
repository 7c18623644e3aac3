"""key_by(model key) -> OnlineTrainer: the model's parameters and optimizer state in keyed state.

Two inputs, both keyed by model key: training samples (1) and catalogue items (2).
State per model key (see docs/design.md "State rules"):
- ``buffer`` ListState of sample rows not yet learned from;
- ``pending_catalogue`` ListState of catalogue rows not yet ingested, with their text
  vectors (udfs/embed.py), and ``pending_count``, their number;
- ``dense`` the dense parameters + optimizer state blob;
- ``rows`` MapState item id -> packed id-embedding row (only touched rows are written);
- ``items`` MapState item id -> packed catalogue entry (text embedding, categories, counts);
- ``meta`` counters (step, version, events seen, high-water mark...), the prequential
  metrics aggregates, the drift detector (models/metrics.py) and the publication gate
  (models/gate.py);
- ``gate`` the graphs of the serving and previously published versions, which the gate
  scores on every step;
- ``flush_timer`` the pending processing-time flush; ``ordered`` (deterministic mode)
  samples waiting for the watermark.

Besides model versions and revocations (main output; a revocation row has the revoked
version's name, the revocation record as its JSON and no graph) every firing that trained
emits its prequential metrics record as JSON on the ``METRICS_TAG`` side output, updates
the operator's Flink metrics (group ``prequential``) and, with ``export.tensorboard_dir``,
TensorBoard scalars.
"""

from __future__ import annotations

import json
import pickle
import threading
import time

from pyflink.common import Types
from pyflink.datastream import KeyedCoProcessFunction, OutputTag, TimeDomain
from pyflink.datastream.state import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor

from models.config import ModelConfig, TrainerConfig
from models.metrics import TensorBoardLog
from models.online import catalogue_horizon, step_due, train_and_maybe_export
from models.text_encoder import configured_precision, lazy_encoder
from models.trainer import OnlineLearner, new_meta, preload
from udfs.buffer import KeyedBuffer
from udfs.malloc import keep_large_blocks
from udfs.records import ITEM_TYPE, SAMPLE_TYPE, row_to_item, row_to_sample

END_OF_INPUT_TS = 2**63 - 2  # fires when a bounded input ends (watermark = Long.MAX_VALUE)
# One JSON metrics record (models.metrics.metrics_record) per firing that trained.
METRICS_TAG = OutputTag("prequential-metrics", Types.STRING())
# Flink gauges are integers: ratios and losses are reported in millionths.
GAUGE_SCALE = 1_000_000


class OnlineTrainer(KeyedCoProcessFunction):
    def __init__(
        self,
        model_cfg: ModelConfig,
        trainer_cfg: TrainerConfig,
        top_k: int,
        config: dict,
        tensorboard_dir: str = "",
        malloc_thresholds: bool = True,
    ):
        self.malloc_thresholds = malloc_thresholds
        self.model_cfg = model_cfg
        self.cfg = trainer_cfg
        self.top_k = top_k
        self.config = config
        self.tensorboard_dir = tensorboard_dir
        self.learners: dict[str, OnlineLearner] = {}

    def open(self, runtime_context):
        rc = runtime_context
        if self.malloc_thresholds:
            keep_large_blocks()
        # The first learner's lazy imports run while the task waits for its first batch.
        threading.Thread(target=preload, name="rtrec-preload", daemon=True).start()
        self.buffer = KeyedBuffer(rc.get_list_state(ListStateDescriptor("buffer", SAMPLE_TYPE)))
        self.pending_items = rc.get_list_state(ListStateDescriptor("pending_catalogue", ITEM_TYPE))
        self.pending_count = rc.get_state(ValueStateDescriptor("pending_count", Types.INT()))
        self.dense = rc.get_state(ValueStateDescriptor("dense", Types.PICKLED_BYTE_ARRAY()))
        self.rows = rc.get_map_state(
            MapStateDescriptor("rows", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
        )
        self.items = rc.get_map_state(
            MapStateDescriptor("items", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
        )
        self.meta = rc.get_state(ValueStateDescriptor("meta", Types.PICKLED_BYTE_ARRAY()))
        self.gate = rc.get_state(ValueStateDescriptor("gate", Types.PICKLED_BYTE_ARRAY()))
        self.flush_timer = rc.get_state(ValueStateDescriptor("flush_timer", Types.LONG()))
        # Deterministic mode: (record timestamp, sample) pairs waiting for the watermark.
        self.ordered = rc.get_list_state(
            ListStateDescriptor("ordered", Types.TUPLE([Types.LONG(), SAMPLE_TYPE]))
        )
        # Mirrors of per-key state this instance has read or written (the hot path touches
        # state once per sample instead of five times). Valid because every change of that
        # state goes through this instance; a restart or rescale opens a new instance, which
        # reads the state again on a key's first element.
        self._armed: set[str] = set()  # end-of-input timer registered (or meta exists)
        self._flush_at: dict[str, int] = {}  # the pending flush timer
        # (end, duration) of each key's last step, monotonic seconds: whether the trainer
        # keeps up with its input (models.online.step_due). Processing time, not state: a
        # restored instance starts as keeping up.
        self._pace: dict[str, tuple[float, float]] = {}
        # Items arrive embedded (udfs/embed.py): the transformer loads only if one does not.
        self.encoder = lazy_encoder(
            self.model_cfg.text_encoder,
            self.model_cfg.text_max_length,
            why="catalogue records arrived without text vectors",
            precision=configured_precision(self.model_cfg, self.cfg.deterministic),
        )
        self._open_metrics(rc.get_metrics_group().add_group("prequential"))
        self.tensorboard = TensorBoardLog(self.tensorboard_dir) if self.tensorboard_dir else None

    def _open_metrics(self, group) -> None:
        """Counters (this subtask's work since it started) and gauges (the latest record's
        values, of the model key that fired last; x1e6 where fractional)."""
        self.last_record: dict = {}
        self.c_batches = group.counter("batches")
        self.c_ranked = group.counter("positives_ranked")
        self.c_hits = group.counter("hits_at_k")
        self.c_drift = group.counter("drift_detections")
        k = self.cfg.metrics_k

        def gauge(section: str, name: str):
            def value() -> int:
                v = self.last_record.get(section, {}).get(name)
                return round(v * GAUGE_SCALE) if isinstance(v, int | float) else 0

            return value

        for section in ("recent", "cumulative"):
            for name, label in ((f"recall@{k}", "recall"), (f"ndcg@{k}", "ndcg"), ("mrr", "mrr")):
                group.gauge(f"{label}_{section}_e6", gauge(section, name))
            group.gauge(f"loss_{section}_e6", gauge(section, "loss"))
        group.gauge("step", lambda: int(self.last_record.get("step", 0)))

    def close(self):
        if getattr(self, "tensorboard", None) is not None:
            self.tensorboard.close()

    def _report(self, record: dict) -> str:
        """Flink metrics + TensorBoard for one metrics record; returns its JSON."""
        self.last_record = record
        b = record["batch"]
        self.c_batches.inc()
        self.c_ranked.inc(b["n"])
        self.c_hits.inc(b["hits"])
        if b["drift_detected"]:
            self.c_drift.inc()
        if self.tensorboard is not None:
            self.tensorboard.write(record)
        return json.dumps(record, sort_keys=True)

    def _meta(self, key: str) -> dict:
        raw = self.meta.value()
        return pickle.loads(raw) if raw is not None else new_meta(key)

    def _arm_timers(self, key: str, ctx) -> None:
        if key not in self._armed:
            if self.meta.value() is None:  # (re-registering the same timer is a no-op)
                ctx.timer_service().register_event_time_timer(END_OF_INPUT_TS)
            self._armed.add(key)
        if not self.cfg.deterministic and key not in self._flush_at:
            at = self.flush_timer.value()
            if at is None:
                at = ctx.timer_service().current_processing_time() + int(
                    self.cfg.flush_after_seconds * 1000
                )
                ctx.timer_service().register_processing_time_timer(at)
                self.flush_timer.update(at)
            self._flush_at[key] = at

    def process_element1(self, value, ctx):
        key = ctx.get_current_key()
        self._arm_timers(key, ctx)
        if self.cfg.deterministic:
            # Train in event-time order behind the watermark: a sample's record timestamp is
            # its window's end, so once the watermark passes it, every sample that sorts
            # before it has arrived, whatever the interleaving of the upstream channels.
            self.ordered.add((ctx.timestamp(), value))
            ctx.timer_service().register_event_time_timer(ctx.timestamp())
            return
        n = self.buffer.add(key, value)
        if n >= self.cfg.batch_size:
            ended, took = self._pace.get(key, (0.0, 0.0))
            if step_due(n, self.cfg, time.monotonic() - ended, took):
                yield from self._fire(key, ctx.timer_service().current_watermark())

    def process_element2(self, value, ctx):
        # Catalogue records take effect in event time: an item is ingested once the
        # catalogue horizon (models.online.catalogue_horizon: the watermark or the newest
        # event learned) passes its ts, so models see the catalogue as it was then.
        self._arm_timers(ctx.get_current_key(), ctx)
        self.pending_items.add(value)
        self.pending_count.update((self.pending_count.value() or 0) + 1)
        ctx.timer_service().register_event_time_timer(int(value[5]))
        return iter(())

    def on_timer(self, timestamp, ctx):
        key = ctx.get_current_key()
        if ctx.time_domain() == TimeDomain.PROCESSING_TIME:
            self.flush_timer.clear()
            self._flush_at.pop(key, None)
            yield from self._fire(key, ctx.timer_service().current_watermark())
        elif self.cfg.deterministic:
            yield from self._drain(key, timestamp, final=timestamp == END_OF_INPUT_TS)
        elif timestamp == END_OF_INPUT_TS:
            yield from self._fire(key, END_OF_INPUT_TS, final=True)
        else:
            yield from self._fire(key, timestamp)

    def _drain(self, key: str, watermark: int, final: bool):
        """Deterministic mode: train on the samples behind the watermark, sorted, in
        batches of exactly ``batch_size`` (a partial batch waits, except at the end)."""
        ready, rest = [], []
        for entry in self.ordered.get():
            (ready if entry[0] <= watermark or final else rest).append(entry)
        ready.sort(key=lambda e: (e[0], e[1][6], e[1][1], e[1][7]))  # window, ts, user, event
        bs = self.cfg.batch_size
        cut = len(ready) if final else len(ready) - len(ready) % bs
        batches = [ready[i : i + bs] for i in range(0, cut, bs)]
        self.ordered.update(ready[cut:] + rest)
        if not batches:
            yield from self._fire(key, watermark, samples=[], final=final)
        for i, batch in enumerate(batches):
            samples = [row_to_sample(row) for _, row in batch]
            yield from self._fire(key, watermark, samples, final=final and i == len(batches) - 1)

    def _due_items(self, horizon: int) -> list:
        """Pending catalogue rows with ts <= ``horizon`` (models.online.catalogue_horizon);
        the rest stay pending."""
        if not self.pending_count.value():
            return []
        due, keep = [], []
        for r in self.pending_items.get():
            (due if r[5] <= horizon else keep).append(r)
        if due:
            self.pending_items.update(keep)
            self.pending_count.update(len(keep))
        return [row_to_item(r) for r in sorted(due, key=lambda r: (r[5], r[1]))]

    def _fire(self, key: str, watermark: int, samples=None, final: bool = False):
        """One learner call; ``samples`` None = everything in the (non-deterministic) buffer."""
        started = time.monotonic()
        meta = self._meta(key)
        learner = self.learners.get(key)
        if learner is None:
            text_dim = self.encoder.dim if self.encoder is not None else 0
            learner = self.learners[key] = OnlineLearner(
                self.model_cfg, self.cfg, text_dim=text_dim
            )
        if samples is None:
            samples = [row_to_sample(r) for r in self.buffer.drain(key)]
        items = self._due_items(catalogue_horizon(watermark, meta, self.cfg.deterministic))
        firing = train_and_maybe_export(
            learner,
            meta,
            samples,
            self.dense.value,
            self.rows.items,
            self.top_k,
            self.config,
            force_export=final,
            items_state=self.items.items,
            new_items=items,
            encoder=self.encoder,
            gate_blob=self.gate.value,
        )
        r = firing.result
        # PyFlink iterates put_all's argument as (key, value) pairs, not as a dict.
        if r.touched_rows:
            self.rows.put_all(list(r.touched_rows.items()))
        for item_id in r.removed_rows:
            self.rows.remove(item_id)
        if r.touched_items:
            self.items.put_all(list(r.touched_items.items()))
        for item_id in r.removed_items:
            self.items.remove(item_id)
        if r.dense_blob is not None:
            self.dense.update(r.dense_blob)
        if r.gate_blob is not None:
            self.gate.update(r.gate_blob)
        self.meta.update(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
        ended = time.monotonic()
        self._pace[key] = (ended, ended - started)
        if firing.metrics is not None:
            yield METRICS_TAG, self._report(firing.metrics)
        if firing.revocation is not None:
            rev = firing.revocation
            yield key, rev.revoked, json.dumps(rev.record(), sort_keys=True), b"", b""
        if firing.version is not None:
            v = firing.version
            extras = pickle.dumps(v.extras, protocol=pickle.HIGHEST_PROTOCOL)
            yield key, v.name, json.dumps(v.manifest, sort_keys=True), v.onnx_bytes, extras
