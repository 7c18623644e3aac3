"""Poisoned versions of a replay stream, for testing the publication gate and bounds.

Both attacks act on a window of the stream's events, given as shares of the event count
(``start``, ``end``); catalogue records and events outside the window are unchanged, and
the result stays in time order.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence

from replay.datasets import Record, _event_record


def _window(records: Sequence[Record], start: float, end: float) -> tuple[list[Record], int, int]:
    events = [r for r in records if r.topic == "events" and r.valid]
    return events, int(len(events) * start), int(len(events) * end)


def label_flip(records: Sequence[Record], start: float, end: float, seed: int = 0) -> list[Record]:
    """Inside the window every rating r becomes 6 - r and every other event points at a
    random catalogue item: what users liked reads as disliked, and the reverse."""
    rng = random.Random(seed)
    items = [json.loads(r.value)["item_id"] for r in records if r.topic == "items"]
    events, a, b = _window(records, start, end)
    flipped = {}
    for r in events[a:b]:
        body = json.loads(r.value)
        value = body.get("value")
        if value is not None:
            value = 6.0 - float(value)
        else:
            body["item_id"] = rng.choice(items)
        flipped[id(r)] = _event_record(
            body["event_id"], body["user_id"], body["item_id"], body["type"], r.ts, value
        )
    return [flipped.get(id(r), r) for r in records]


def shilling(
    records: Sequence[Record],
    start: float,
    end: float,
    fake_users: int,
    fillers: int = 20,
    seed: int = 0,
) -> tuple[list[Record], str]:
    """``fake_users`` new users inside the window, each buying one target item (one of the
    least interacted-with quarter before the window) among ``fillers`` random views.
    Returns the stream and the target item."""
    rng = random.Random(seed)
    items = [json.loads(r.value)["item_id"] for r in records if r.topic == "items"]
    events, a, b = _window(records, start, end)
    counts: dict[str, int] = {}
    for r in events[:a]:
        item = json.loads(r.value)["item_id"]
        counts[item] = counts.get(item, 0) + 1
    cold = sorted(items, key=lambda i: (counts.get(i, 0), i))[: max(1, len(items) // 4)]
    target = rng.choice(cold)
    t0, t1 = events[a].ts, events[b - 1].ts
    fake = []
    for f in range(fake_users):
        picks = rng.sample(items, min(fillers, len(items)))
        slot = rng.randint(0, len(picks))
        for n, item in enumerate([*picks[:slot], target, *picks[slot:]]):
            etype = "purchase" if item == target else "view"
            ts = rng.randint(t0, t1)
            fake.append(_event_record(f"fake{f}-{n}", f"fake{f}", item, etype, ts, None))
    return sorted([*records, *fake], key=lambda r: (r.ts, r.topic != "items")), target
