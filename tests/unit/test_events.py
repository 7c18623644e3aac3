import json

import pytest

from models.events import InvalidRecord, dead_letter, parse_event, parse_item, pseudonymise
from replay.datasets import hostile_payloads


def test_valid_event_parses():
    e = parse_event(
        b'{"event_id":"e1","user_id":7,"item_id":"i9","type":"rating","value":4.5,"ts":1700000000000}'
    )
    assert (e.event_id, e.user_id, e.item_id, e.type, e.value, e.ts) == (
        "e1",
        "7",
        "i9",
        "rating",
        4.5,
        1700000000000,
    )


@pytest.mark.parametrize(
    "payload", hostile_payloads(__import__("random").Random(1), 1_700_000_000_000)
)
def test_every_hostile_payload_is_rejected_with_a_reason(payload):
    with pytest.raises(InvalidRecord) as err:
        parse_event(payload)
    reason = str(err.value)
    assert reason and len(reason) < 300
    record = json.loads(dead_letter(payload, reason, "events"))
    assert record["reason"] == reason and record["source"] == "events"
    # The original payload is kept (as text, or hex when it is not UTF-8).
    if payload:
        assert record["payload"]


def test_reasons_name_the_field():
    with pytest.raises(InvalidRecord, match="'type' must be one of"):
        parse_event('{"event_id":"1","user_id":"u","item_id":"i","type":"x","ts":1}')
    with pytest.raises(InvalidRecord, match="missing required field 'user_id'"):
        parse_event('{"event_id":"1","item_id":"i","type":"view","ts":1}')
    with pytest.raises(InvalidRecord, match="not UTF-8"):
        parse_event(b"\xff\xfe")


def test_dead_letter_keeps_binary_as_hex():
    assert json.loads(dead_letter(b"\xff\x00", "r", "events"))["payload"] == "hex:ff00"


def test_pseudonymise_is_stable_and_keyed():
    a = pseudonymise("alice", b"k1")
    assert a == pseudonymise("alice", b"k1")
    assert a != pseudonymise("alice", b"k2")
    assert "alice" not in a and len(a) == 32


def test_item_record():
    it = parse_item('{"item_id":"m1","title":"T","text":"x","categories":["a"],"ts":5}')
    assert it.categories == ("a",)
    with pytest.raises(InvalidRecord):
        parse_item('{"item_id":"m1","categories":"a","ts":5}')


def test_lone_surrogate_escapes_are_rejected_not_passed_on():
    # Valid JSON whose decoded strings cannot be encoded as UTF-8: Flink's string
    # serializer (and the HMAC) would raise on them downstream and fail the job.
    event = '{"event_id":"e","user_id":"u\\ud800","item_id":"i","type":"view","ts":1}'
    with pytest.raises(InvalidRecord, match="'user_id' contains a lone UTF-16 surrogate"):
        parse_event(event)
    item = '{"item_id":"i","title":"t","text":"x","categories":["ok","c\\udfff"],"ts":1}'
    with pytest.raises(InvalidRecord, match="'categories' contains a lone UTF-16 surrogate"):
        parse_item(item)
    # A surrogate pair is one character (here an emoji), and valid.
    ok = parse_event(
        '{"event_id":"e","user_id":"\\ud83d\\ude00","item_id":"i","type":"view","ts":1}'
    )
    assert ok.user_id == "\U0001f600"


def test_forget_requests_parse_or_name_what_is_wrong():
    from models.events import parse_forget

    assert parse_forget(b'{"action": "forget", "user_id": "alice", "ts": 5}') == ("alice", 5)
    assert parse_forget(b'{"action": "forget", "user_id": 7}', record_ts=9) == ("7", 9)
    for raw, says in [
        (b'{"action": "erase", "user_id": "a", "ts": 1}', "field 'action' must be 'forget'"),
        (b'{"action": "forget", "ts": 1}', "missing required field 'user_id'"),
        (b'{"action": "forget", "user_id": "a"}', "no record timestamp"),
        (b"not json", ""),
    ]:
        with pytest.raises(InvalidRecord, match=says):
            parse_forget(raw)
