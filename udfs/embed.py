"""key_by(catalogue bucket) -> EmbedItemTexts: item text -> text vector, before the trainer.

The transformer is the costliest part of catalogue ingestion. Inside the trainer it would
run in the one sequential learner and block its training, and the checkpoints waiting on
it, for as long as a catalogue load takes. Here it runs beside the trainer, with the job's
parallelism, and the trainer ingests ready vectors.

Items are batched per bucket (``model key`` + hash of the item id, so one item's records
keep their order) in a ListState, so a buffered item is never only in Python memory. A
bucket's batch is embedded when it holds ``BATCH`` items, after ``FLUSH_MS`` of processing
time, or when the watermark passes an item's ts: an item always leaves before the
watermark that makes it due in the trainer (deterministic mode depends on that).
"""

from __future__ import annotations

import zlib

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, TimeDomain
from pyflink.datastream.state import ListStateDescriptor, ValueStateDescriptor

from models.config import ModelConfig
from models.text_encoder import embed_items, lazy_encoder
from udfs.buffer import KeyedBuffer
from udfs.malloc import keep_large_blocks
from udfs.records import ITEM_TYPE, item_to_row, row_to_item

BUCKETS = 16  # per model key: enough to spread a catalogue load over a few subtasks
BATCH = 64  # items per transformer call (the encoder's own batch size)
FLUSH_MS = 200  # the longest an item waits for its batch to fill


def bucket_key(row: tuple) -> str:
    """The embedding stage's key of an item row: model key + a hash bucket of its id."""
    return f"{row[0]}\x1f{zlib.crc32(row[1].encode('utf-8')) % BUCKETS}"


class EmbedItemTexts(KeyedProcessFunction):
    def __init__(
        self,
        model_cfg: ModelConfig,
        torch_threads: int,
        precision: str,
        malloc_thresholds: bool = True,
    ) -> None:
        """``precision``: the run's :func:`models.text_encoder.configured_precision`;
        ``malloc_thresholds``: ``job.malloc_thresholds`` (udfs/malloc.py)."""
        self.model_cfg = model_cfg
        self.torch_threads, self.precision = torch_threads, precision
        self.malloc_thresholds = malloc_thresholds

    def open(self, runtime_context):
        rc = runtime_context
        if self.malloc_thresholds:
            keep_large_blocks()
        self.buffer = KeyedBuffer(rc.get_list_state(ListStateDescriptor("buffer", ITEM_TYPE)))
        self.flush_at = rc.get_state(ValueStateDescriptor("flush_at", Types.LONG()))
        # Loaded by the first batch: a restart that restores no new catalogue records
        # (the usual recovery) never pays for the weights.
        self.encoder = lazy_encoder(
            self.model_cfg.text_encoder,
            self.model_cfg.text_max_length,
            why="first catalogue batch",
            threads=self.torch_threads,
            precision=self.precision,
        )

    def process_element(self, value, ctx):
        key = ctx.get_current_key()
        n = self.buffer.add(key, value)
        ctx.timer_service().register_event_time_timer(int(value[5]))
        if self.flush_at.value() is None:
            at = ctx.timer_service().current_processing_time() + FLUSH_MS
            ctx.timer_service().register_processing_time_timer(at)
            self.flush_at.update(at)
        if n >= BATCH:
            yield from self._flush(key)

    def on_timer(self, timestamp, ctx):
        if ctx.time_domain() == TimeDomain.PROCESSING_TIME:
            self.flush_at.clear()
        yield from self._flush(ctx.get_current_key())

    def _flush(self, key: str):
        rows = self.buffer.drain(key)
        if not rows:
            return
        items = [row_to_item(r) for r in rows]
        if self.encoder is not None:
            items = embed_items(items, self.encoder)
        for r, it in zip(rows, items, strict=True):
            yield item_to_row(r[0], it)
