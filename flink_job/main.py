"""Entry point for `flink run --python flink_job/main.py -- [--config F] [--set k=v ...]`.

Builds the same graph as `rtrec run` inside the environment the Flink CLI provides
(a remote cluster), then submits it.
"""

from __future__ import annotations

import argparse
import logging

from flink_job.config import load_config
from flink_job.job import build_job, make_env
from flink_job.keys import require_deployment_key


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="flink_job.main")
    p.add_argument("--config")
    p.add_argument("--set", action="append", default=[], dest="overrides")
    p.add_argument("--detached", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_config(args.config, args.overrides)
    require_deployment_key(cfg)
    if not cfg.kafka.bootstrap_servers:
        raise SystemExit("kafka.bootstrap_servers must be set when submitting to a cluster")
    env = make_env(cfg)
    build_job(env, cfg, cfg.kafka.bootstrap_servers)
    if args.detached:
        env.execute_async(cfg.job.name)
    else:
        env.execute(cfg.job.name)


if __name__ == "__main__":
    main()
