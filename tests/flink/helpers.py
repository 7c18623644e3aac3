"""Small Flink functions shared by the flink-tier tests."""

from __future__ import annotations

import json

from pyflink.common import Types, WatermarkStrategy
from pyflink.common.watermark_strategy import TimestampAssigner


class FieldTs(TimestampAssigner):
    """Event time from a tuple record's field ``field`` (milliseconds)."""

    def __init__(self, field: int) -> None:
        self.field = field

    def extract_timestamp(self, value, record_timestamp):
        return int(value[self.field])


class JsonTs(TimestampAssigner):
    """Event time from a JSON record's "ts"."""

    def extract_timestamp(self, value, record_timestamp):
        return int(json.loads(value)["ts"])


def json_stream(env, payloads: list[bytes]):
    """Raw JSON records as the Kafka source gives them (bytes; event time = their "ts",
    monotonous watermarks), from a collection, at parallelism 1."""
    return (
        env.from_collection([p.decode() for p in payloads], type_info=Types.STRING())
        .map(lambda s: s.encode(), output_type=Types.PRIMITIVE_ARRAY(Types.BYTE()))
        .assign_timestamps_and_watermarks(
            WatermarkStrategy.for_monotonous_timestamps().with_timestamp_assigner(JsonTs())
        )
        .set_parallelism(1)
    )
