"""Record layouts between operators (typed tuples: cheaper than pickling objects)."""

from __future__ import annotations

import math

from pyflink.common import Types

from models.events import Event, Item
from models.history import Sample

# event_id, user_id (pseudonymised), item_id, type, ts, value (NaN = none)
EVENT_TYPE = Types.TUPLE(
    [Types.STRING(), Types.STRING(), Types.STRING(), Types.STRING(), Types.LONG(), Types.DOUBLE()]
)
# model_key, user_id, history ("\x1f"-joined, oldest -> newest), target, label, weight, ts,
# event_id, context (joined like history; "" = the same as history)
SAMPLE_TYPE = Types.TUPLE(
    [
        Types.STRING(),
        Types.STRING(),
        Types.STRING(),
        Types.STRING(),
        Types.INT(),
        Types.DOUBLE(),
        Types.LONG(),
        Types.STRING(),
        Types.STRING(),
    ]
)
# model_key, version name, manifest JSON, ONNX bytes, extra files {name: bytes}
VERSION_TYPE = Types.TUPLE(
    [
        Types.STRING(),
        Types.STRING(),
        Types.STRING(),
        Types.PICKLED_BYTE_ARRAY(),
        Types.PICKLED_BYTE_ARRAY(),
    ]
)
# model_key, item_id, title, text, categories ("\x1f"-joined), ts, text vector (float32
# bytes of the configured text encoder, b"" until udfs/embed.py has embedded the text)
ITEM_TYPE = Types.TUPLE(
    [
        Types.STRING(),
        Types.STRING(),
        Types.STRING(),
        Types.STRING(),
        Types.STRING(),
        Types.LONG(),
        Types.PICKLED_BYTE_ARRAY(),
    ]
)
SEP = "\x1f"


def event_to_row(e: Event) -> tuple:
    return (
        e.event_id,
        e.user_id,
        e.item_id,
        e.type,
        e.ts,
        math.nan if e.value is None else e.value,
    )


def row_to_event(r: tuple) -> Event:
    v = r[5]
    return Event(
        r[0], r[1], r[2], r[3], int(r[4]), None if v is None or math.isnan(v) else float(v)
    )


def item_to_row(model_key: str, it: Item) -> tuple:
    return (
        model_key,
        it.item_id,
        it.title,
        it.text,
        SEP.join(it.categories),
        it.ts,
        it.text_vector,
    )


def row_to_item(r: tuple) -> Item:
    """An ITEM_TYPE row -> Item (a null text vector reads as b"": not embedded yet)."""
    return Item(r[1], r[2], r[3], tuple(r[4].split(SEP)) if r[4] else (), int(r[5]), r[6] or b"")


def sample_to_row(s: Sample) -> tuple:
    return (
        s.model_key,
        s.user_id,
        SEP.join(s.history),
        s.target,
        s.label,
        s.weight,
        s.ts,
        s.event_id,
        "" if s.context is None else SEP.join(s.context),
    )


def row_to_sample(r: tuple) -> Sample:
    hist = tuple(r[2].split(SEP)) if r[2] else ()
    ctx = tuple(r[8].split(SEP)) if r[8] else None  # "": the history is the context
    return Sample(r[0], r[1], hist, r[3], int(r[4]), float(r[5]), int(r[6]), r[7], ctx)
