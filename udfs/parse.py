"""Parse + validate raw Kafka records; invalid ones go to the dead-letter side output."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from pyflink.common import Types
from pyflink.datastream import OutputTag, ProcessFunction

from models.events import (
    Event,
    InvalidRecord,
    dead_letter,
    parse_event,
    parse_forget,
    parse_item,
    pseudonymise,
)
from udfs.records import event_to_row, item_to_row

DLQ_TAG = OutputTag("dead-letters", Types.STRING())
T = TypeVar("T")
log = logging.getLogger(__name__)


def _parsed(value, parse: Callable[[Any], T], source: str) -> tuple[T | None, str | None]:
    """(``parse(value)``, None), or (None, the dead letter naming why it is invalid)."""
    try:
        return parse(value), None
    except InvalidRecord as err:
        return None, dead_letter(value, str(err), source)
    except Exception as err:  # a bug in validation must not lose the record or kill the job
        log.exception("unexpected error validating a record of %s", source)
        return None, dead_letter(value, f"internal validation error: {err!r}", source)


class ParseEvents(ProcessFunction):
    """bytes -> event row; anything invalid -> DLQ_TAG with the reason. Never raises."""

    def __init__(self, source_topic: str, hmac_key: str) -> None:
        self.source = source_topic
        self.key = hmac_key.encode() if hmac_key else b""

    def process_element(self, value, ctx):
        e, dead = _parsed(value, parse_event, self.source)
        if dead is not None:
            yield DLQ_TAG, dead
            return
        if self.key:
            e = Event(
                e.event_id, pseudonymise(e.user_id, self.key), e.item_id, e.type, e.ts, e.value
            )
        yield event_to_row(e)


class ParseControl(ProcessFunction):
    """Control bytes -> a forget request as an event row (type "forget", the user id
    pseudonymised as ParseEvents does); invalid records -> DLQ_TAG. Never raises."""

    def __init__(self, source_topic: str, hmac_key: str) -> None:
        self.source = source_topic
        self.key = hmac_key.encode() if hmac_key else b""

    def process_element(self, value, ctx):
        request, dead = _parsed(value, lambda v: parse_forget(v, ctx.timestamp()), self.source)
        if dead is not None:
            yield DLQ_TAG, dead
            return
        user, ts = request
        if self.key:
            user = pseudonymise(user, self.key)
        yield event_to_row(Event("forget", user, "", "forget", ts))


class ParseItems(ProcessFunction):
    """Catalogue bytes -> item row for ``model_key``; invalid records -> DLQ_TAG."""

    def __init__(self, source_topic: str, model_key: str) -> None:
        self.source = source_topic
        self.model_key = model_key

    def process_element(self, value, ctx):
        it, dead = _parsed(value, parse_item, self.source)
        if dead is not None:
            yield DLQ_TAG, dead
            return
        yield item_to_row(self.model_key, it)


class LateToDeadLetter:
    """Map a late event row to a DLQ record naming why it was not trained on."""

    def __init__(self, source_topic: str) -> None:
        self.source = source_topic

    def __call__(self, row: tuple) -> str:
        return dead_letter(
            f"event_id={row[0]} item_id={row[2]} ts={row[4]}",
            "late event: its event time is behind the watermark of its user's window "
            "(raise job.out_of_orderness_ms to accept it)",
            self.source,
        )
