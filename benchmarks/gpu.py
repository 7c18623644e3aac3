"""Accelerator check: trainer samples/s, onnxruntime rankings/s and text-encoder items/s
on the current device.

The device is CUDA when present, else CPU (``RTREC_DEVICE`` overrides, as in the job).
Prints the device name (``torch.cuda.get_device_name``). Baseline measured in the same
run: the same measurements on the CPU (skipped when the device is the CPU; ratio 1).
``--skip-without-gpu`` (what ``rtrec bench`` passes) measures nothing on a machine without
one: it says so and writes a result marked ``skipped``.

- trainer: ``train_and_maybe_export`` (the Flink trainer's call) on Zipf samples over a
  catalogue with MiniLM-width (384) text vectors, default model/trainer config;
- onnxruntime: the exported version ranked by ``OnnxRecommender`` (the serving path), on
  CUDA's execution provider for a CUDA device;
- text encoder: the configured ``model.text_encoder`` (bundled all-MiniLM-L6-v2 by
  default) embedding catalogue texts in batches of 64 (what the trainer does on ingest).
"""

from __future__ import annotations

import os
import time
from typing import Any

import _common as C


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def configs(batch_size: int, threads: int):
    """(ModelConfig, TrainerConfig) of the trainer measurement: defaults, with exports
    never due inside the timed loop."""
    from models.config import ModelConfig, TrainerConfig

    tcfg = TrainerConfig(
        batch_size=batch_size,
        export_every_steps=10**9,
        export_every_seconds=1e12,
        torch_threads=threads or TrainerConfig.torch_threads,
    )
    return ModelConfig(), tcfg


def trainer_rate(
    device, n_items: int, samples: int, batch_size: int, threads: int
) -> dict[str, Any]:
    from catalogue import RandomTextEncoder, make_items, make_samples

    from models.export import build_version
    from models.online import train_and_maybe_export
    from models.trainer import OnlineLearner, new_meta

    mcfg, tcfg = configs(batch_size, threads)
    enc = RandomTextEncoder()
    learner = OnlineLearner(mcfg, tcfg, device=device, text_dim=enc.dim)
    meta = new_meta("default")
    train_and_maybe_export(
        learner, meta, [], lambda: None, lambda: (), 50, {},
        new_items=make_items(n_items), encoder=enc,
    )  # fmt: skip
    data = make_samples(n_items, samples + 5 * batch_size, mcfg.history_length)
    batches = [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    for b in batches[:5]:
        train_and_maybe_export(learner, meta, b, lambda: None, lambda: (), 50, {})
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for b in batches[5:]:
        train_and_maybe_export(learner, meta, b, lambda: None, lambda: (), 50, {})
        n += len(b)
    _sync(device)
    learn_s = time.perf_counter() - t0
    # The first export of a process traces the ONNX graphs (models/export.py caches them);
    # a running trainer pays that once, so the timed export is the second one.
    build_version(learner, meta, 50, {})
    t0 = time.perf_counter()
    version = build_version(learner, meta, 50, {})
    export_s = time.perf_counter() - t0
    return {
        "trainer_samples_per_s": n / learn_s,
        "export_s": export_s,
        **serving_rate(device, version),
    }


def serving_rate(device, version, batch: int = 256, rounds: int = 20) -> dict[str, Any]:
    """onnxruntime top-k rankings/s of the exported version through ``OnnxRecommender``
    (what ``rtrec serve`` runs), with CUDA's execution provider for a CUDA device and the
    CPU's otherwise; requests of ``batch`` random full histories."""
    import tempfile

    import numpy as np

    from models.registry import publish
    from models.serving import OnnxRecommender

    with tempfile.TemporaryDirectory() as d:
        rec = OnnxRecommender(publish(d, version) / "model.onnx", gpu=device.type == "cuda")
        rng = np.random.default_rng(0)
        ids = rng.integers(1, len(rec.item_ids) + 1, size=(batch, rec.history_length))
        mask = ids > 0
        rec.raw(ids, mask)  # warm-up: kernels, memory arena
        t0 = time.perf_counter()
        for _ in range(rounds):
            rec.raw(ids, mask)
        rate = batch * rounds / (time.perf_counter() - t0)
        return {"onnx_rankings_per_s": rate, "onnx_provider": rec.session.get_providers()[0]}


def encoder_rate(device, spec: str, texts: int) -> dict[str, Any]:
    from catalogue import make_items

    from models.text_encoder import TextEncoder, resolve_model_dir

    path = resolve_model_dir(spec)
    if path is None:
        return {"encoder_items_per_s": None}
    items = make_items(texts + 64)
    strs = [f"{it.title}. {it.text}" for it in items]
    out: dict[str, Any] = {}
    # model.text_precision "auto" (bfloat16 where native) against float32, in the same run.
    for spec in ("auto", "float32"):
        enc = TextEncoder(path, device=device, precision=spec)
        enc.encode(strs[:64])  # warm-up
        _sync(device)
        t0 = time.perf_counter()
        enc.encode(strs[64:])
        _sync(device)
        rate = texts / (time.perf_counter() - t0)
        if spec == "auto":
            out.update(encoder_items_per_s=rate, encoder=enc.name, encoder_precision=enc.precision)
        else:
            out["encoder_float32_items_per_s"] = rate
    return out


def measure(device, args) -> dict[str, Any]:
    C.log(f"{device}: trainer, {args.samples} samples over {args.items} items")
    import torch

    r: dict[str, Any] = {"device": str(device)}
    r.update(trainer_rate(device, args.items, args.samples, args.batch_size, args.threads))
    # The learner sets the process's thread count (trainer.torch_threads), as in the job.
    r["torch_threads"] = torch.get_num_threads()
    C.log(f"{device}: text encoder {args.encoder}, {args.texts} texts")
    r.update(encoder_rate(device, args.encoder, args.texts))
    return r


def main(argv: list[str] | None = None) -> int:
    p = C.parser("gpu", __doc__)
    p.add_argument("--items", type=int, default=10_000, help="catalogue size")
    p.add_argument("--samples", type=int, default=20_000, help="timed trainer samples")
    p.add_argument("--batch-size", type=int, default=64, help="trainer.batch_size")
    p.add_argument("--texts", type=int, default=4096, help="timed encoder texts")
    p.add_argument("--encoder", default="minilm", help="model.text_encoder ('none' skips it)")
    p.add_argument("--no-cpu-baseline", action="store_true", help="skip the CPU baseline")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads of the trainer and encoder (0 = the default of "
        "trainer.torch_threads, as in the job)",
    )
    p.add_argument(
        "--skip-without-gpu",
        action="store_true",
        help="on a machine without a GPU, measure nothing: say so and write a skipped result",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.items, args.samples, args.texts = 2000, 640, 256
    import torch

    from models.device import pick_device

    device = pick_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mcfg, tcfg = configs(args.batch_size, args.threads)
    config = {"model": mcfg, "trainer": tcfg}
    if device.type == "cpu" and args.skip_without_gpu:
        reason = (
            f"no GPU: the device is the CPU (torch.cuda.is_available() "
            f"{torch.cuda.is_available()}, RTREC_DEVICE={os.environ.get('RTREC_DEVICE') or '-'})"
        )
        headline = f"skipped, {reason}"
        print(f"gpu.py: {headline}")
        C.write_result(
            args.out,
            "gpu",
            args,
            {"device_name": name, "skipped": reason, "rows": [], "headline": headline},
            config=config,
        )
        return 0
    # (The learner sets the thread count, --threads or trainer.torch_threads: the table's
    # torch_threads column, not the process's count before it.)
    print(f"device: {device} ({name}); torch {torch.__version__}")
    rows = [{"run": "device", "device_name": name, **measure(device, args)}]
    if device.type != "cpu" and not args.no_cpu_baseline:
        rows.append(
            {"run": "cpu baseline", "device_name": "cpu", **measure(torch.device("cpu"), args)}
        )
    base = rows[-1]
    for r in rows:
        r["trainer_vs_cpu"] = C.ratio(r["trainer_samples_per_s"], base["trainer_samples_per_s"])
        r["encoder_vs_cpu"] = C.ratio(r["encoder_items_per_s"], base["encoder_items_per_s"])
        r["onnx_vs_cpu"] = C.ratio(r["onnx_rankings_per_s"], base["onnx_rankings_per_s"])
    # torch_threads: the CPU threads the learner runs with (trainer.torch_threads, 1 by
    # default as in the job); the encoder runs with the same number.
    cols = [
        "run", "device_name", "torch_threads", "trainer_samples_per_s", "trainer_vs_cpu",
        "export_s", "onnx_provider", "onnx_rankings_per_s", "onnx_vs_cpu",
        "encoder_precision", "encoder_items_per_s", "encoder_float32_items_per_s", "encoder_vs_cpu",
    ]  # fmt: skip
    print(C.table(rows, cols))
    d = rows[0]
    enc = d["encoder_items_per_s"]
    headline = (
        f"{name}: trainer {d['trainer_samples_per_s']:.0f} samples/s "
        f"({d['trainer_vs_cpu']:.1f}x cpu), onnxruntime {d['onnx_rankings_per_s']:.0f} "
        f"rankings/s on {d['onnx_provider']} ({d['onnx_vs_cpu']:.1f}x cpu), encoder "
        + (
            f"{enc:.0f} items/s in {d['encoder_precision']} ({d['encoder_vs_cpu']:.1f}x cpu; "
            f"{d['encoder_float32_items_per_s']:.0f} in float32)"
            if enc
            else "skipped"
        )
    )
    print(headline)
    C.write_result(
        args.out,
        "gpu",
        args,
        {
            "device_name": name,
            "rows": rows,
            "baseline": "cpu",
            "figures": figures(rows),
            "headline": headline,
        },
        config=config,
    )
    return 0


def figures(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The device's trainer, onnxruntime and encoder rates against the CPU's (the device's
    own figures, ratio 1, when the device is the CPU)."""
    d, base = rows[0], rows[-1]
    cpu = "CPU" if base is not d else "CPU (the device itself)"
    on = f"on {d['device_name']}"
    out = [
        C.figure(
            f"trainer {on}", d["trainer_samples_per_s"], "samples/s",
            cpu, base["trainer_samples_per_s"], headline=True,
        ),
        C.figure(f"export a version {on}", d["export_s"], "s", cpu, base["export_s"]),
        C.figure(
            f"onnxruntime rankings {on} ({d['onnx_provider']})", d["onnx_rankings_per_s"],
            "rankings/s", cpu, base["onnx_rankings_per_s"],
        ),
    ]  # fmt: skip
    if d.get("encoder_items_per_s") is not None:
        out += [
            C.figure(
                f"text encoder {on} ({d['encoder_precision']})", d["encoder_items_per_s"],
                "items/s", cpu, base["encoder_items_per_s"],
            ),
            C.figure(
                f"text encoder {on}, {d['encoder_precision']} vs float32",
                d["encoder_items_per_s"], "items/s", "float32, same device",
                d["encoder_float32_items_per_s"],
            ),
        ]  # fmt: skip
    return out


if __name__ == "__main__":
    raise SystemExit(main())
