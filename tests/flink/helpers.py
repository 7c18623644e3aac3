"""Small Flink functions shared by the flink-tier tests."""

from __future__ import annotations

from pyflink.common.watermark_strategy import TimestampAssigner


class FieldTs(TimestampAssigner):
    """Event time from a tuple record's field ``field`` (milliseconds)."""

    def __init__(self, field: int) -> None:
        self.field = field

    def extract_timestamp(self, value, record_timestamp):
        return int(value[self.field])
