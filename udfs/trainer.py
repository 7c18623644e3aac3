"""key_by(model key) -> OnlineTrainer: the model's parameters and optimizer state in keyed state.

State per model key (see DESIGN.md "State rules"):
- ``buffer`` ListState of sample rows not yet learned from, ``buffered`` their count;
- ``dense`` the dense parameters + optimizer state blob;
- ``rows`` MapState item id -> packed id row (only touched rows are written);
- ``meta`` counters (step, version, events seen, high-water mark...).
"""

from __future__ import annotations

import json
import pickle

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, TimeDomain
from pyflink.datastream.state import ListStateDescriptor, MapStateDescriptor, ValueStateDescriptor

from models.config import ModelConfig, TrainerConfig
from models.online import train_and_maybe_export
from models.trainer import OnlineLearner, new_meta
from udfs.records import SAMPLE_TYPE, row_to_sample

END_OF_INPUT_TS = 2**63 - 2  # fires when a bounded input ends (watermark = Long.MAX_VALUE)


class OnlineTrainer(KeyedProcessFunction):
    def __init__(
        self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig, top_k: int, config: dict
    ):
        self.model_cfg = model_cfg
        self.cfg = trainer_cfg
        self.top_k = top_k
        self.config = config
        self.learners: dict[str, OnlineLearner] = {}

    def open(self, runtime_context):
        rc = runtime_context
        self.buffer = rc.get_list_state(ListStateDescriptor("buffer", SAMPLE_TYPE))
        self.buffered = rc.get_state(ValueStateDescriptor("buffered", Types.INT()))
        self.dense = rc.get_state(ValueStateDescriptor("dense", Types.PICKLED_BYTE_ARRAY()))
        self.rows = rc.get_map_state(
            MapStateDescriptor("rows", Types.STRING(), Types.PICKLED_BYTE_ARRAY())
        )
        self.meta = rc.get_state(ValueStateDescriptor("meta", Types.PICKLED_BYTE_ARRAY()))
        self.flush_timer = rc.get_state(ValueStateDescriptor("flush_timer", Types.LONG()))

    def _meta(self, key: str) -> dict:
        raw = self.meta.value()
        return pickle.loads(raw) if raw is not None else new_meta(key)

    def process_element(self, value, ctx):
        key = ctx.get_current_key()
        self.buffer.add(value)
        n = (self.buffered.value() or 0) + 1
        if n == 1 and self.meta.value() is None:
            ctx.timer_service().register_event_time_timer(END_OF_INPUT_TS)
        if n >= self.cfg.batch_size:
            yield from self._fire(key, final=False)
            return
        self.buffered.update(n)
        if not self.cfg.deterministic and self.flush_timer.value() is None:
            at = ctx.timer_service().current_processing_time() + int(
                self.cfg.flush_after_seconds * 1000
            )
            ctx.timer_service().register_processing_time_timer(at)
            self.flush_timer.update(at)

    def on_timer(self, timestamp, ctx):
        key = ctx.get_current_key()
        if ctx.time_domain() == TimeDomain.PROCESSING_TIME:
            self.flush_timer.clear()
            yield from self._fire(key, final=False)
        elif timestamp == END_OF_INPUT_TS:
            yield from self._fire(key, final=True)

    def _fire(self, key: str, final: bool):
        meta = self._meta(key)
        learner = self.learners.get(key)
        if learner is None:
            learner = self.learners[key] = OnlineLearner(self.model_cfg, self.cfg)
        samples = [row_to_sample(r) for r in self.buffer.get()]
        firing = train_and_maybe_export(
            learner,
            meta,
            samples,
            self.dense.value,
            self.rows.items,
            self.top_k,
            self.config,
            force_export=final,
        )
        if firing.result.touched_rows:
            # PyFlink iterates the argument as (key, value) pairs, not as a dict.
            self.rows.put_all(list(firing.result.touched_rows.items()))
        if firing.result.dense_blob is not None:
            self.dense.update(firing.result.dense_blob)
        self.buffer.clear()
        self.buffered.clear()
        self.meta.update(pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL))
        if firing.version is not None:
            v = firing.version
            yield key, v.name, json.dumps(v.manifest, sort_keys=True), v.onnx_bytes
