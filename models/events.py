"""Event and catalogue record schemas, validation and pseudonymisation.

Every record from Kafka goes through :func:`parse_event`; anything that is not a valid
event raises :class:`InvalidRecord` with a reason that names the field and the rule,
so the job can route the raw payload to the dead-letter topic instead of crashing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass
from typing import Any

EVENT_TYPES = ("view", "click", "cart", "purchase", "rating")
MAX_ID_LEN = 256
MAX_PAYLOAD_BYTES = 64 * 1024
# Accept event times from 1970 up to 2100 (MovieLens starts in 1996).
MIN_TS_MS = 0
MAX_TS_MS = 4_102_444_800_000


class InvalidRecord(ValueError):
    """A record that cannot be used; ``str(e)`` is the dead-letter reason."""


@dataclass(frozen=True, slots=True)
class Event:
    """One user-behaviour event. ``user_id`` is already pseudonymised when it comes from the job."""

    event_id: str
    user_id: str
    item_id: str
    type: str
    ts: int
    value: float | None = None


@dataclass(frozen=True, slots=True)
class Item:
    """One catalogue record from the ``items`` topic."""

    item_id: str
    title: str
    text: str
    categories: tuple[str, ...]
    ts: int
    # The item text's embedding when an upstream stage already computed it: float32 bytes
    # [T] of the configured text encoder (udfs/embed.py); empty = not embedded yet.
    text_vector: bytes = b""

    @property
    def full_text(self) -> str:
        """The text the encoder embeds: "title. text" (or the title alone)."""
        return f"{self.title}. {self.text}".strip(". ") if self.text else self.title


def _id(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise InvalidRecord(f"missing required field '{key}'")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise InvalidRecord(f"field '{key}' must be a string or integer, got {type(v).__name__}")
    s = str(v)
    if not s or not s.strip():
        raise InvalidRecord(f"field '{key}' is empty")
    if len(s) > MAX_ID_LEN:
        raise InvalidRecord(f"field '{key}' is longer than {MAX_ID_LEN} characters")
    if any(ord(c) < 32 for c in s):
        raise InvalidRecord(f"field '{key}' contains control characters")
    _check_text(s, key)
    return s


def _check_text(s: str, key: str) -> None:
    """JSON can escape a lone UTF-16 surrogate ("\\ud800"); Python's json decodes it into a
    str that cannot be encoded as UTF-8, so it would fail later, in Flink's string
    serializer or the HMAC, and take the job down with it."""
    if not s.isascii():
        try:
            s.encode("utf-8")
        except UnicodeEncodeError as e:
            raise InvalidRecord(
                f"field '{key}' contains a lone UTF-16 surrogate escape "
                f"({s[e.start]!r} at character {e.start}), which is not text"
            ) from None


def _ts(obj: dict[str, Any], key: str = "ts") -> int:
    if key not in obj:
        raise InvalidRecord(f"missing required field '{key}' (epoch milliseconds)")
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRecord(
            f"field '{key}' must be epoch milliseconds (a number), got {type(v).__name__}"
        )
    if isinstance(v, float) and (not math.isfinite(v) or v != int(v)):
        raise InvalidRecord(
            f"field '{key}' must be an integer number of epoch milliseconds, got {v!r}"
        )
    t = int(v)
    if not MIN_TS_MS <= t <= MAX_TS_MS:
        raise InvalidRecord(f"field '{key}'={t} is outside 1970..2100 in epoch milliseconds")
    return t


def _load_object(raw: str | bytes) -> dict[str, Any]:
    if isinstance(raw, bytes):
        if len(raw) > MAX_PAYLOAD_BYTES:
            raise InvalidRecord(
                f"record is {len(raw)} bytes, more than the {MAX_PAYLOAD_BYTES} limit"
            )
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidRecord(f"record is not UTF-8: {e}") from e
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidRecord(
            f"record is {len(raw)} characters, more than the {MAX_PAYLOAD_BYTES} limit"
        )
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise InvalidRecord(f"record is not valid JSON: {e}") from e
    except ValueError as e:  # e.g. an integer of more than 4,300 digits (CPython's limit)
        raise InvalidRecord(f"record has a number Python refuses to read: {e}") from e
    if not isinstance(obj, dict):
        raise InvalidRecord(f"record must be a JSON object, got {type(obj).__name__}")
    return obj


def parse_event(raw: str | bytes) -> Event:
    """Validate one JSON event (event_id, user_id, item_id, type, ts, optional value) or
    raise InvalidRecord."""
    obj = _load_object(raw)
    etype = obj.get("type")
    if etype not in EVENT_TYPES:
        raise InvalidRecord(f"field 'type' must be one of {', '.join(EVENT_TYPES)}; got {etype!r}")
    value: float | None = None
    if obj.get("value") is not None:
        v = obj["value"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidRecord(f"field 'value' must be a finite number, got {v!r}")
        value = float(v)
    if etype == "rating":
        if value is None:
            raise InvalidRecord("a 'rating' event needs a numeric 'value'")
        if not 0.0 <= value <= 10.0:
            raise InvalidRecord(f"rating value {value} is outside 0..10")
    return Event(
        event_id=_id(obj, "event_id"),
        user_id=_id(obj, "user_id"),
        item_id=_id(obj, "item_id"),
        type=etype,
        ts=_ts(obj),
        value=value,
    )


def parse_item(raw: str | bytes) -> Item:
    """Validate one catalogue record (item_id, title, text, categories, ts)."""
    obj = _load_object(raw)
    title = obj.get("title", "")
    text = obj.get("text", "")
    cats = obj.get("categories", [])
    if not isinstance(title, str) or not isinstance(text, str):
        raise InvalidRecord("fields 'title' and 'text' must be strings")
    if not isinstance(cats, list) or not all(isinstance(c, str) for c in cats):
        raise InvalidRecord("field 'categories' must be a list of strings")
    for key, s in (("title", title), ("text", text), *(("categories", c) for c in cats)):
        _check_text(s, key)
    return Item(_id(obj, "item_id"), title, text, tuple(cats), _ts(obj))


def parse_forget(raw: str | bytes, record_ts: int | None = None) -> tuple[str, int]:
    """Validate one control record ``{"action": "forget", "user_id": ..., "ts": ...}`` ->
    (raw user id, event time of the request) or raise InvalidRecord. Without ``ts`` the
    request takes the record's own timestamp ``record_ts`` (the time it was sent)."""
    obj = _load_object(raw)
    if obj.get("action") != "forget":
        raise InvalidRecord(f"field 'action' must be 'forget'; got {obj.get('action')!r}")
    if "ts" in obj:
        ts = _ts(obj)
    elif record_ts is not None and MIN_TS_MS <= record_ts <= MAX_TS_MS:
        ts = record_ts
    else:
        raise InvalidRecord("missing field 'ts' (epoch milliseconds) and no record timestamp")
    return _id(obj, "user_id"), ts


def pseudonymise(user_id: str, key: bytes) -> str:
    """Keyed HMAC-SHA256 of a user id (first 16 bytes, hex): stable per key, not reversible."""
    return hmac.new(key, user_id.encode("utf-8"), hashlib.sha256).hexdigest()[:32]


def dead_letter(raw: str | bytes, reason: str, source: str) -> str:
    """The DLQ record: original payload (text, or hex if not UTF-8), reason and source."""
    if isinstance(raw, bytes):
        try:
            payload = raw.decode("utf-8")
        except UnicodeDecodeError:
            payload = "hex:" + raw.hex()
    else:
        payload = raw
    return json.dumps({"reason": reason, "source": source, "payload": payload}, ensure_ascii=False)
