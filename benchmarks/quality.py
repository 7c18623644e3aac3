"""Quality: prequential Recall@K / NDCG@K of the online model against the baselines.

Runs ``rtrec eval``'s evaluation (``offline.evaluate.run_eval``: test-then-train over the
stream after a warm-up, the whole catalogue ranked, the user's history excluded) on a
dataset: the built-in synthetic stream by default, or a MovieLens-format directory
(``--dataset DIR``, e.g. ml-latest-small). ``--permute-ids`` / ``--shuffle-ties`` apply
the evaluation guards (``replay.permute_ids`` / ``replay.shuffle_ties``).

Figures: the online model's Recall@K and NDCG@K; the baseline of the same run is the
strongest baseline on that metric (ratio = online / strongest), and every baseline's
figure is recorded too.
"""

from __future__ import annotations

import json
import time

import _common as C


def _times(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = C.parser("quality", __doc__)
    p.add_argument("--dataset", default="synthetic", help="'synthetic' or a MovieLens dir")
    p.add_argument("--warmup", type=float, default=0.2, help="leading share learned only")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--permute-ids", action="store_true", help="guard: opaque item ids")
    p.add_argument("--shuffle-ties", action="store_true", help="guard: shuffled ties")
    p.add_argument(
        "--head", type=float, default=1.0, help="the first share of the samples only (tuning)"
    )
    p.add_argument(
        "--cache-dir",
        default="",
        help="embedding cache of `rtrec eval` (its seconds then leave embedding out; '' = off)",
    )
    args = p.parse_args(argv)

    from offline.evaluate import render_markdown, run_eval
    from offline.stream import to_stream
    from replay.datasets import records

    overrides = [f"replay.dataset={json.dumps(args.dataset)}"]
    if args.quick and args.dataset == "synthetic":
        overrides += ["replay.num_events=3000", "model.text_encoder='none'"]
    overrides += args.set
    overrides += ["replay.permute_ids=true"] if args.permute_ids else []
    overrides += ["replay.shuffle_ties=true"] if args.shuffle_ties else []
    cfg = C.config(overrides)
    t0 = time.perf_counter()
    stream = list(to_stream(records(cfg.replay), cfg))
    if args.head < 1.0:
        from offline.training import split_stream

        stream, _ = split_stream(stream, args.head)
    res = run_eval(
        cfg, stream, warmup=args.warmup, k=args.k, progress=True, cache_dir=args.cache_dir
    )
    seconds = time.perf_counter() - t0
    print(render_markdown(res))

    k, models = args.k, res["models"]
    figures = []
    for metric, label in ((f"recall@{k}", f"Recall@{k}"), (f"ndcg@{k}", f"NDCG@{k}")):
        best = res["online_vs_best_baseline"][metric]["best_baseline"]
        figures.append(
            C.figure(
                f"online {label}",
                models["online"]["overall"][metric],
                "",
                baseline=f"strongest baseline ({best})",
                baseline_value=models[best]["overall"][metric],
                headline=True,
            )
        )
        figures += [
            C.figure(f"{name} {label}", m["overall"][metric], "")
            for name, m in models.items()
            if name != "online"
        ]
    r, n = figures[0], next(f for f in figures if f["headline"] and f is not figures[0])
    headline = (
        f"quality: online Recall@{k} {r['value']:.4f} / NDCG@{k} {n['value']:.4f}; "
        f"online / {r['baseline']} {_times(r['ratio'])} / {_times(n['ratio'])}"
    )
    print(headline)
    C.write_result(
        args.out,
        "quality",
        args,
        {
            "figures": figures,
            "headline": headline,
            "dataset": args.dataset,
            "test_positives": res["test_positives"],
            "catalogue_items": res["catalogue_items"],
            "seconds": round(seconds, 1),
            "eval": {name: m["overall"] for name, m in models.items()},
            "buckets": res.get("buckets"),
            "per_bucket": {name: m["per_bucket"] for name, m in models.items()},
        },
        config=cfg,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
