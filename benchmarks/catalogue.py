"""Catalogue scaling: the trainer's cost with 1k, 10k, 100k items (no Flink).

For each catalogue size N: a fresh OnlineLearner ingests N catalogue items (text vectors
from a fixed random 384-dim "encoder", so the language model's own cost is excluded: see
gpu.py for it), then learns from Zipf-distributed samples over the N items through
``train_and_maybe_export`` (the call the Flink trainer makes), and exports model versions
with ``build_version`` (ONNX + item matrix over the whole catalogue; the first export,
which traces the ONNX graphs, is not timed).

Figures: learn samples/s, export seconds per version, ingest items/s; the baseline is the
smallest size of the same run (ratios N / smallest).
"""

from __future__ import annotations

import random
import time
from typing import Any

import _common as C
import numpy as np


class RandomTextEncoder:
    """Stands in for the language model: a deterministic random unit vector per text."""

    def __init__(self, dim: int = 384) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            v = np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out


def make_samples(n_items: int, n: int, history: int, seed: int = 0) -> list:
    from models.history import Sample

    rng = random.Random(seed)
    out = []
    users: dict[int, list[str]] = {}
    for k in range(n):
        u = rng.randrange(max(100, n_items // 10))
        item = f"item{min(int(rng.paretovariate(0.8)) - 1, n_items - 1)}"
        if rng.random() < 0.5:  # uniform share: the whole catalogue gets touched
            item = f"item{rng.randrange(n_items)}"
        hist = users.setdefault(u, [])
        out.append(
            Sample("default", f"u{u}", tuple(hist[-history:]), item, 1, 1.0, 1000 + k, str(k))
        )
        hist.append(item)
        del hist[:-history]
    return out


def make_items(n_items: int) -> list:
    from models.events import Item
    from replay.datasets import TOPICS

    topics = list(TOPICS)
    items = []
    for i in range(n_items):
        t = topics[i % len(topics)]
        words = TOPICS[t]
        text = (
            f"A {t} piece about {words[i % 8]}, {words[(i // 8) % 8]} and {words[(i // 64) % 8]}."
        )
        items.append(Item(f"item{i}", f"{words[i % 8].title()} #{i}", text, (t,), 0))
    return items


def configs(n_items: int, encoder: str, batch_size: int):
    """The (ModelConfig, TrainerConfig) of a size: defaults, room for ``n_items``, and
    exports never due inside the learn loop (they are timed separately)."""
    from models.config import ModelConfig, TrainerConfig

    mcfg = ModelConfig(max_items=max(100_000, n_items), text_encoder=encoder)
    tcfg = TrainerConfig(batch_size=batch_size, export_every_steps=10**9, export_every_seconds=1e12)
    return mcfg, tcfg


def bench_size(
    n_items: int, samples: int, exports: int, encoder: str, batch_size: int
) -> dict[str, Any]:
    import torch

    from models.export import build_version
    from models.online import train_and_maybe_export
    from models.trainer import OnlineLearner, new_meta

    mcfg, tcfg = configs(n_items, encoder, batch_size)
    enc = RandomTextEncoder() if encoder != "none" else None
    learner = OnlineLearner(mcfg, tcfg, text_dim=enc.dim if enc else 0)
    meta = new_meta("default")
    items = make_items(n_items)
    t0 = time.perf_counter()
    for b in range(0, n_items, 1000):
        train_and_maybe_export(
            learner, meta, [], lambda: None, lambda: (), 50, {},
            new_items=items[b : b + 1000], encoder=enc,
        )  # fmt: skip
    ingest_s = time.perf_counter() - t0
    data = make_samples(n_items, samples + 5 * batch_size, mcfg.history_length)
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    for batch in batches[:5]:  # warm-up (allocator, first-touch rows)
        train_and_maybe_export(learner, meta, batch, lambda: None, lambda: (), 50, {})
    t0 = time.perf_counter()
    n = 0
    for batch in batches[5:]:
        train_and_maybe_export(learner, meta, batch, lambda: None, lambda: (), 50, {})
        n += len(batch)
    learn_s = time.perf_counter() - t0
    # The first export of a process traces the ONNX graphs (models/export.py caches them),
    # once per running trainer: untimed, so that every size's figure is a steady export.
    build_version(learner, meta, 50, {})
    export_times = []
    size = 0
    for _ in range(exports):
        t0 = time.perf_counter()
        v = build_version(learner, meta, 50, {})
        export_times.append(time.perf_counter() - t0)
        meta["version"] = v.version
        size = len(v.onnx_bytes) + sum(len(x) for x in v.extras.values())
    return {
        "items": n_items,
        "catalogue_live": len(learner.catalog),
        "id_rows": len(learner.table),
        "learn_samples": n,
        "learn_samples_per_s": n / learn_s,
        "export_s": float(np.median(export_times)),
        "version_mb": size / 1e6,
        "ingest_items_per_s": n_items / ingest_s,
        "device": str(learner.device),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> int:
    p = C.parser("catalogue", __doc__)
    p.add_argument("--sizes", default="1000,10000,100000", help="catalogue sizes (items)")
    p.add_argument("--samples", type=int, default=20_000, help="timed samples per size")
    p.add_argument("--exports", type=int, default=3, help="timed exports per size (median)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--encoder",
        choices=["random384", "none"],
        default="random384",
        help="item text vectors: fixed random 384-dim (MiniLM's width) or id-only items",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.samples, args.exports = "1000,5000,20000", 1000, 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    C.log(f"torch intra-op threads: {torch.get_num_threads()}")
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        C.log(
            f"catalogue {n} items: ingest, learn {args.samples} samples, {args.exports} export(s)"
        )
        rows.append(bench_size(n, args.samples, args.exports, args.encoder, args.batch_size))
    base = rows[0]
    for r in rows:
        r["learn_vs_smallest"] = C.ratio(r["learn_samples_per_s"], base["learn_samples_per_s"])
        r["export_vs_smallest"] = C.ratio(r["export_s"], base["export_s"])
    cols = [
        "items", "learn_samples_per_s", "learn_vs_smallest", "export_s",
        "export_vs_smallest", "version_mb", "ingest_items_per_s", "device",
    ]  # fmt: skip
    print(C.table(rows, cols))
    summary = {
        "headline": (
            f"learn {rows[-1]['learn_samples_per_s']:.0f} samples/s at {rows[-1]['items']} items "
            f"({rows[-1]['learn_vs_smallest']:.2f}x of {base['items']}), "
            f"export {rows[-1]['export_s']:.2f}s ({rows[-1]['export_vs_smallest']:.1f}x)"
        )
    }
    print(summary["headline"])
    mcfg, tcfg = configs(sizes[-1], args.encoder, args.batch_size)
    C.write_result(
        args.out,
        "catalogue",
        args,
        {"rows": rows, "baseline": "smallest size", "figures": figures(rows), **summary},
        config={"model": mcfg, "trainer": tcfg, "largest_size": sizes[-1]},
    )
    return 0


def figures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size: learn rate, export time and ingest rate, each against the smallest size."""
    base = rows[0]
    smallest = f"{base['items']:,} items"
    out = []
    for r in rows:
        last = r is rows[-1]
        out += [
            C.figure(
                f"learn, {r['items']:,} items", r["learn_samples_per_s"], "samples/s",
                smallest, base["learn_samples_per_s"], headline=last and len(rows) > 1,
            ),
            C.figure(
                f"export a version, {r['items']:,} items", r["export_s"], "s",
                smallest, base["export_s"],
            ),
            C.figure(
                f"ingest the catalogue, {r['items']:,} items", r["ingest_items_per_s"],
                "items/s", smallest, base["ingest_items_per_s"],
            ),
        ]  # fmt: skip
    return out


if __name__ == "__main__":
    raise SystemExit(main())
