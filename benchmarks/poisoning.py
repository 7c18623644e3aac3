"""Poisoned streams against the publication gate: what is served, with and without it.

The job's trainer (deterministic mode, ``offline.stream.trainer_without_flink``: the
firings and the learning code of the Flink job, without Flink) learns a synthetic stream:
a clean half, an attack window, then clean events again. Two attacks, each run with
``trainer.publish_gate`` on and off:

- *shilling*: ``--fake-share`` of the user count in fake users, each promoting one
  target item (a purchase) among ``--fillers`` random items (views), inside the window;
- *label flip*: inside the window every rating r becomes 6 - r and every other event
  points at a random item, so what was liked reads as disliked and the reverse.

What is *served* at a moment is the newest version the registry would have as LATEST
then: the newest published, unrevoked version (gate on), or simply the newest (gate off).
It is scored with onnxruntime, as serving runs it, on clean queries from after the
window: Recall@10 of each query's next item and the target's top-10 hit ratio (the share
of queries whose top 10 hold the shilled item). Figures at the end of the window and at
the end of the stream, and the number of versions held. The baseline of each figure is
the same attack run with the gate off.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import _common as C


def streams(args: Any) -> tuple[dict[str, list[Any]], str, list[Any], int]:
    """{attack: records}, the shilled item, the clean evaluation queries, end of window."""
    from flink_job.config import ReplayConfig
    from replay.attacks import label_flip, shilling
    from replay.datasets import synthetic

    replay = ReplayConfig(
        num_events=args.events,
        num_users=args.users,
        num_items=args.items,
        new_items_midstream=0,
        malformed_fraction=0.0,
        seed=args.seed,
    )
    records = list(synthetic(replay))
    start, end = 0.5, 0.65
    fakes = max(1, int(args.users * args.fake_share))
    shilled, target = shilling(records, start, end, fakes, args.fillers, args.seed)
    flipped = label_flip(records, start, end, args.seed)
    events = [r for r in records if r.topic == "events"]
    b = int(len(events) * end)
    # Clean queries after the window: each user's positives so far, then the next one.
    queries, hist = [], {}
    for n, r in enumerate(events):
        body = json.loads(r.value)
        h = hist.setdefault(body["user_id"], [])
        if n >= b and len(queries) < args.queries and len(h) >= 3:
            queries.append((list(h[-50:]), body["item_id"]))
        if body.get("value") is None or float(body["value"]) >= 3.5:
            h.append(body["item_id"])
    return {"shilling": shilled, "label flip": flipped}, target, queries, events[b - 1].ts


def served(run: Any, gate: bool, at_ms: int) -> Any:
    """The version LATEST would name once the trainer's high-water mark passed ``at_ms``."""
    revoked = {r["revoked"] for r in run.revocations if r["event_time_hwm_ms"] <= at_ms}
    ok = [
        v
        for v in run.versions
        if v.manifest["event_time_hwm_ms"] <= at_ms
        and (not gate or v.manifest["publication"]["status"] == "published")
        and v.name not in revoked
    ]
    return ok[-1] if ok else None


def score(version: Any, queries: list[tuple[list[str], str]], target: str) -> dict[str, float]:
    from models.serving import OnnxRecommender

    rec = OnnxRecommender(version.onnx_bytes, gpu=False, threads=1, manifest={})
    top = rec.recommend([q for q, _ in queries], 10)
    got = [{i for i, _ in row} for row in top]
    n = max(1, len(queries))
    return {
        "recall@10": sum(nxt in g for (_, nxt), g in zip(queries, got, strict=True)) / n,
        "target_hit@10": sum(target in g for g in got) / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = C.parser("poisoning", __doc__)
    p.add_argument("--events", type=int, default=24_000)
    p.add_argument("--users", type=int, default=600)
    p.add_argument("--items", type=int, default=400)
    p.add_argument("--fake-share", type=float, default=0.05, help="fake users / users")
    p.add_argument("--fillers", type=int, default=20, help="random items per fake user")
    p.add_argument("--queries", type=int, default=1000, help="clean evaluation queries")
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args(argv)
    if args.quick:
        args.events, args.users, args.queries = 6000, 200, 300

    from flink_job.config import load_config
    from offline.stream import trainer_without_flink

    base = load_config(
        None,
        [
            "trainer.deterministic=true",
            "model.text_encoder='none'",
            "trainer.export_every_steps=10",
            *args.set,
        ],
    )
    by_attack, target, queries, window_end = streams(args)
    rows, figures = [], []
    for attack, records in by_attack.items():
        per_gate = {}
        for gate in (False, True):
            cfg = dataclasses.replace(
                base, trainer=dataclasses.replace(base.trainer, publish_gate=gate)
            )
            C.log(f"{attack}, gate {'on' if gate else 'off'}: training")
            run = trainer_without_flink(records, cfg)
            held = sum(v.manifest["publication"]["status"] == "held" for v in run.versions)
            row: dict[str, Any] = {
                "attack": attack,
                "gate": "on" if gate else "off",
                "versions": len(run.versions),
                "held": held,
                "rollbacks": len(run.revocations),
            }
            end = max(v.manifest["event_time_hwm_ms"] for v in run.versions)
            for label, at in (("window end", window_end), ("stream end", end)):
                v = served(run, gate, at)
                s = score(v, queries, target) if v is not None else {}
                row[f"recall@10 ({label})"] = s.get("recall@10")
                row[f"target hit ({label})"] = s.get("target_hit@10")
                row[f"served ({label})"] = v.version if v is not None else None
            rows.append(row)
            per_gate[gate] = row
            C.log(f"  {row}")
        on, off = per_gate[True], per_gate[False]
        for label in ("window end", "stream end"):
            for metric in ("recall@10", "target hit"):
                key = f"{metric} ({label})"
                figures.append(
                    C.figure(
                        f"{attack}: {key} served, gate on",
                        on[key],
                        "share",
                        "gate off",
                        off[key],
                        headline=(attack, label, metric)
                        == ("label flip", "window end", "recall@10"),
                    )
                )
        figures.append(C.figure(f"{attack}: versions held", float(on["held"]), "versions"))
    print(C.table(rows))
    C.write_result(
        args.out, "poisoning", args, {"rows": rows, "target": target, "figures": figures}, base
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
