"""Datasets to replay into Kafka: a synthetic stream and MovieLens-format files.

Both yield :class:`Record` objects in event-time order: catalogue records go to the
``items`` topic, events to the ``events`` topic. The synthetic stream also injects a
share of hostile records (bad JSON, wrong types, control characters, binary garbage...)
so the dead-letter path is always exercised.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from flink_job.config import ReplayConfig

START_TS_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z

TOPICS: dict[str, list[str]] = {
    "jazz": ["saxophone", "swing", "bebop", "trumpet", "improvisation", "club", "blue", "quartet"],
    "football": ["goal", "league", "striker", "derby", "stadium", "transfer", "coach", "cup"],
    "cooking": ["recipe", "pasta", "oven", "spice", "kitchen", "bread", "soup", "chef"],
    "space": ["rocket", "orbit", "galaxy", "planet", "astronaut", "telescope", "mars", "launch"],
    "gardening": ["tomato", "soil", "compost", "seeds", "roses", "greenhouse", "pruning", "bloom"],
    "finance": ["stocks", "bonds", "interest", "budget", "inflation", "savings", "market", "bank"],
    "hiking": ["trail", "summit", "boots", "backpack", "ridge", "camping", "map", "valley"],
    "gaming": [
        "console",
        "quest",
        "level",
        "multiplayer",
        "controller",
        "boss",
        "arcade",
        "speedrun",
    ],
}
EVENT_TYPE_WEIGHTS = {"view": 0.55, "click": 0.25, "cart": 0.08, "purchase": 0.04, "rating": 0.08}


@dataclass
class Record:
    topic: str  # "events" or "items" (logical names; mapped to configured topics on replay)
    key: bytes
    value: bytes
    ts: int  # event time in epoch ms; replay writes it as the Kafka record timestamp
    valid: bool = True


@dataclass
class ReplayStats:
    events: int = 0
    malformed: int = 0
    items: int = 0
    item_ids_in_events: set[str] = field(default_factory=set)
    titles: dict[str, str] = field(default_factory=dict)
    # Raw user id -> last items (oldest -> newest) and event count, for the demo's printout.
    histories: dict[str, list[str]] = field(default_factory=dict)
    user_events: dict[str, int] = field(default_factory=dict)

    def saw(self, user: str, item: str, positive: bool) -> None:
        self.events += 1
        self.item_ids_in_events.add(item)
        self.user_events[user] = self.user_events.get(user, 0) + 1
        if positive:
            hist = self.histories.setdefault(user, [])
            hist.append(item)
            del hist[:-50]


def _item_record(item_id: str, title: str, text: str, cats: list[str], ts: int) -> Record:
    body = {"item_id": item_id, "title": title, "text": text, "categories": cats, "ts": ts}
    return Record("items", item_id.encode(), json.dumps(body).encode(), ts)


def _event_record(
    event_id: str, user: str, item: str, etype: str, ts: int, value: float | None
) -> Record:
    body: dict[str, object] = {
        "event_id": event_id,
        "user_id": user,
        "item_id": item,
        "type": etype,
        "ts": ts,
    }
    if value is not None:
        body["value"] = value
    return Record("events", user.encode(), json.dumps(body, separators=(",", ":")).encode(), ts)


def hostile_payloads(rng: random.Random, ts: int) -> list[bytes]:
    """Malformed records of every kind the validator must reject."""
    ok = {
        "event_id": f"bad{rng.randrange(10**9)}",
        "user_id": "u1",
        "item_id": "i1",
        "type": "click",
        "ts": ts,
    }

    def variant(**changes: object) -> bytes:
        d = dict(ok)
        for k, v in changes.items():
            if v is _DROP:
                d.pop(k)
            else:
                d[k] = v
        return json.dumps(d).encode()

    return [
        b"{not json",
        b"",
        b"null",
        b"[1, 2, 3]",
        b"\xff\xfe\x00garbage\x80",
        variant(user_id=_DROP),
        variant(item_id=None),
        variant(type="teleport"),
        variant(ts="yesterday"),
        variant(ts=-5),
        variant(user_id=""),
        variant(item_id={"nested": 1}),
        variant(type="rating"),  # rating without value
        variant(type="rating", value=99),
        b'{"event_id":"x","user_id":"u","item_id":"i","type":"click","ts":1,"value":NaN}',
        variant(user_id="a\x00b"),
        # Lone UTF-16 surrogate escapes ("\\ud800"): valid JSON, but not text.
        variant(user_id="u\ud800"),
        variant(event_id="e\udc00"),
        variant(item_id="\ud83d"),
        variant(item_id="x" * 5000),
        # An integer of more digits than CPython converts (4,300).
        b'{"event_id":"big","user_id":"u1","item_id":"i1","type":"click","ts":'
        + b"9" * 5000
        + b"}",
        b"[" * 100_000,
    ]


_DROP = object()


def synthetic(cfg: ReplayConfig, stats: ReplayStats | None = None) -> Iterator[Record]:
    """Users with drifting topic tastes, Zipf popularity, sequential structure, new items.

    Items belong to topics; their titles/text use topic words (so a text encoder can tell
    topics apart). Each user prefers one topic (sometimes two) and, every
    ``drift_every_events`` events, a share ``drift_fraction`` of the users (a fifth by
    default) move to another topic; with ``drift_reshuffle`` each topic's items are also
    reshuffled then (other items become popular and follow each other). Within a
    topic, the next item is usually close to the previous one (sequential signal); a
    Zipf law sets popularity. ``new_items_midstream`` items first appear in the catalogue
    halfway through and are then interacted with.
    """
    st = stats if stats is not None else ReplayStats()
    rng = random.Random(cfg.seed)
    topics = list(TOPICS)
    n_initial = max(len(topics), cfg.num_items - cfg.new_items_midstream)
    items_by_topic: dict[str, list[str]] = {t: [] for t in topics}
    ts = START_TS_MS

    def make_item(n: int, ts: int) -> Record:
        topic = topics[n % len(topics)]
        words = rng.sample(TOPICS[topic], 3)
        item_id = f"item{n}"
        items_by_topic[topic].append(item_id)
        title = f"{words[0].title()} {words[1]} #{n}"
        text = f"A {topic} piece about {words[0]}, {words[1]} and {words[2]}."
        st.items += 1
        st.titles[item_id] = f"{title} [{topic}]"
        return _item_record(item_id, title, text, [topic], ts)

    for n in range(n_initial):
        yield make_item(n, ts)
    taste = {u: rng.randrange(len(topics)) for u in range(cfg.num_users)}
    second = {u: rng.randrange(len(topics)) for u in range(cfg.num_users)}
    last_pos: dict[int, int] = {}
    # Users arrive in bursts (sessions), as in real streams.
    user_weights = [1.0 / math.sqrt(u + 1) for u in range(cfg.num_users)]
    next_new = n_initial
    new_at = cfg.num_events // 2
    session_user, session_left = 0, 0
    malformed_every = int(1 / cfg.malformed_fraction) if cfg.malformed_fraction > 0 else 0
    hostile = hostile_payloads(rng, ts)
    for e in range(cfg.num_events):
        ts += rng.randint(100, 3000)
        if e >= new_at and next_new < cfg.num_items:
            yield make_item(next_new, ts)
            next_new += 1
        if cfg.drift_every_events and e and e % cfg.drift_every_events == 0:
            movers = max(1, int(cfg.num_users * cfg.drift_fraction))
            for u in rng.sample(range(cfg.num_users), min(movers, cfg.num_users)):
                taste[u] = rng.randrange(len(topics))
            if cfg.drift_reshuffle:  # item-level drift: new popular items and sequences
                for pool in items_by_topic.values():
                    rng.shuffle(pool)
        if malformed_every and e % malformed_every == malformed_every // 2:
            st.malformed += 1
            yield Record("events", b"bad", hostile[st.malformed % len(hostile)], ts, valid=False)
        if session_left <= 0:
            session_user = rng.choices(range(cfg.num_users), weights=user_weights)[0]
            session_left = rng.randint(3, 15)
        session_left -= 1
        u = session_user
        topic = topics[taste[u] if rng.random() < 0.85 else second[u]]
        pool = items_by_topic[topic]
        if u in last_pos and rng.random() < 0.6:
            # Sequential: a near neighbour of the last item in this topic.
            pos = (last_pos[u] + rng.choice([1, 1, 2, -1, 3])) % len(pool)
        else:
            # Zipf within the topic; the newest items get a freshness boost.
            pos = min(int(rng.paretovariate(1.2)) - 1, len(pool) - 1)
            if rng.random() < 0.2:
                pos = len(pool) - 1 - rng.randrange(min(5, len(pool)))
        last_pos[u] = pos
        item = pool[pos]
        etype = rng.choices(list(EVENT_TYPE_WEIGHTS), weights=list(EVENT_TYPE_WEIGHTS.values()))[0]
        value = float(rng.choice([3, 4, 4, 5, 5, 2])) if etype == "rating" else None
        st.saw(f"user{u}", item, positive=value is None or value >= 3.5)
        yield _event_record(f"e{e}", f"user{u}", item, etype, ts, value)


def movielens(
    directory: str | Path, max_events: int = 0, stats: ReplayStats | None = None
) -> Iterator[Record]:
    """Replay a MovieLens-format directory (ratings.csv, movies.csv) in timestamp order.

    Every movie becomes a catalogue record (text = title + genres); every rating becomes a
    ``rating`` event with ``value`` = the rating and ``ts`` = timestamp * 1000.
    """
    st = stats if stats is not None else ReplayStats()
    d = Path(directory)
    ratings_path, movies_path = d / "ratings.csv", d / "movies.csv"
    for p in (ratings_path, movies_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"{p} not found: a MovieLens directory needs ratings.csv and movies.csv "
                "(e.g. ml-latest-small from grouplens.org)"
            )
    with open(ratings_path, newline="") as fh:
        rows = [
            (int(r["timestamp"]) * 1000, r["userId"], r["movieId"], float(r["rating"]))
            for r in csv.DictReader(fh)
        ]
    rows.sort(key=lambda r: (r[0], r[1], r[2]))
    if max_events:
        rows = rows[:max_events]
    first_ts = rows[0][0] if rows else START_TS_MS
    with open(movies_path, newline="", encoding="utf-8") as fh:
        for m in csv.DictReader(fh):
            genres = [g for g in m["genres"].split("|") if g and g != "(no genres listed)"]
            text = f"{m['title']}. Genres: {', '.join(genres) or 'unknown'}."
            st.items += 1
            st.titles[m["movieId"]] = f"{m['title']} [{'|'.join(genres)}]"
            yield _item_record(m["movieId"], m["title"], text, genres, first_ts)
    for ts, user, movie, rating in rows:
        st.saw(user, movie, positive=rating >= 3.5)
        yield _event_record(f"ml-{user}-{movie}-{ts}", user, movie, "rating", ts, rating)


def kafka_time_range(
    bootstrap: str,
    events_topic: str,
    items_topic: str,
    from_ts: int,
    to_ts: int,
    properties: dict[str, str] | None = None,
) -> list[Record]:
    """Records of a Kafka time range [from_ts, to_ts), events and catalogue merged by time.

    The catalogue is read from the beginning of time up to ``to_ts`` (items published
    before the range are part of the catalogue the range's events refer to).
    """
    from infra.kafka import read_time_range

    out = [
        Record("items", k, v, ts)
        for ts, k, v in (
            read_time_range(bootstrap, items_topic, 0, to_ts, properties) if items_topic else []
        )
    ]
    out += [
        Record("events", k, v, ts)
        for ts, k, v in read_time_range(bootstrap, events_topic, from_ts, to_ts, properties)
    ]
    out.sort(key=lambda r: (r.ts, r.topic != "items"))  # items first at equal times
    return out


def records(cfg: ReplayConfig, stats: ReplayStats | None = None) -> Iterator[Record]:
    """The configured dataset, with the evaluation guards applied (``replay.shuffle_ties``
    first, then ``replay.permute_ids``)."""
    out = (
        synthetic(cfg, stats)
        if cfg.dataset == "synthetic"
        else movielens(cfg.dataset, cfg.max_events, stats)
    )
    if cfg.shuffle_ties:
        out = shuffle_ties(out, cfg.guard_seed)
    if cfg.permute_ids:
        out = permute_item_ids(out, cfg.guard_seed)
    return out


def _body(rec: Record) -> dict[str, object] | None:
    """A valid record's JSON object, None for anything else (left untouched)."""
    if not rec.valid:
        return None
    try:
        body = json.loads(rec.value)
    except (ValueError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


def permute_item_ids(recs: Iterator[Record], seed: int = 0) -> Iterator[Record]:
    """Every item id replaced by a random opaque id (the same item keeps the same new id in
    the catalogue and in events), and every event id by a keyed hash of it, because event
    ids may embed item ids and break event-time ties. Invalid records pass unchanged."""
    key = f"rtrec-permute-{seed}".encode()
    rng = random.Random(seed)
    mapping: dict[str, str] = {}
    used: set[str] = set()

    def new_id(old: str) -> str:
        if old not in mapping:
            while (cand := f"i{rng.getrandbits(48):012x}") in used:
                pass
            used.add(cand)
            mapping[old] = cand
        return mapping[old]

    for rec in recs:
        body = _body(rec)
        if body is None or not isinstance(body.get("item_id"), (str, int)):
            yield rec
            continue
        body["item_id"] = new_id(str(body["item_id"]))
        if rec.topic == "items":
            value = json.dumps(body).encode()
            yield Record(rec.topic, str(body["item_id"]).encode(), value, rec.ts, rec.valid)
            continue
        if isinstance(body.get("event_id"), (str, int)):
            digest = hashlib.blake2b(str(body["event_id"]).encode(), key=key, digest_size=8)
            body["event_id"] = digest.hexdigest()
        value = json.dumps(body, separators=(",", ":")).encode()
        yield Record(rec.topic, rec.key, value, rec.ts, rec.valid)


def shuffle_ties(recs: Iterator[Record], seed: int = 0) -> Iterator[Record]:
    """Events with equal timestamps in a random order, and event ids renumbered in that
    order, because the user stage orders a window's events by (ts, event_id). Catalogue
    records and invalid records keep their place relative to the runs around them."""
    rng = random.Random(seed)
    run: list[Record] = []
    seq = 0

    def flush() -> Iterator[Record]:
        nonlocal seq
        rng.shuffle(run)
        for rec in run:
            body = _body(rec)
            if body is not None:
                body["event_id"] = f"s{seq:010d}"
                value = json.dumps(body, separators=(",", ":")).encode()
                rec = Record(rec.topic, rec.key, value, rec.ts, rec.valid)
            seq += 1
            yield rec
        run.clear()

    for rec in recs:
        if rec.topic != "events" or _body(rec) is None:
            yield from flush()
            yield rec
            continue
        if run and run[0].ts != rec.ts:
            yield from flush()
        run.append(rec)
    yield from flush()
