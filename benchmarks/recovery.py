"""Recovery: kill -9 a TaskManager of a standalone cluster -> processing resumed (seconds).

A real standalone Flink cluster (JobManager + 2 TaskManagers with two slots each, from the
pip package's scripts, ``infra.cluster.StandaloneCluster``) runs the job at
parallelism 2 (so both TaskManagers hold tasks), checkpointing every 10 s, fed live by
the synthetic stream (``--rate`` events/s, event time = wall clock) on the embedded broker.

Once the job has published a version and completed a checkpoint (+ ``--settle`` s), the
TaskManager 0 process group (its Python workers included) is killed with SIGKILL and a
replacement TaskManager is started at once (what a supervisor would do).

``--spare-taskmanagers`` (default 0) TaskManagers join after the cold start, so they hold
no tasks: a spare's free slots let the job restart at once instead of waiting for the
replacement to start and register (a JVM start-up), as Flink's
``slotmanager.redundant-taskmanager-num`` does on Kubernetes / YARN. On a single small
machine the replacement's start-up competes with the restarting workers for the same
cores, so a spare gains little there; with TaskManagers on machines of their own it takes
the replacement's start-up out of recovery.
``--replace after-recovery`` (with spares) starts the replacement once the job runs
again, as when it comes up on another machine.

Measured from the kill, through the JobManager REST API and the registry:

- detected_s: the job leaves RUNNING (failure detected, restart begins);
- running_s: the job and every one of its tasks are RUNNING again (state restored);
- resumed_s: the first model version of the restarted job is published (the trainer is
  learning again; one that the failed attempt finished just before the failover, seen
  before the tasks run again, does not count).

Baseline measured in the same run: the cold start of the same job on the same cluster
(submit -> all tasks RUNNING, submit -> first version); printed: recovery / cold start.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import _common as C


def all_running(address: str, jid: str, restarted_after_ms: int = 0) -> bool:
    """The job and all its tasks RUNNING (and, if given, restarted after that instant)."""
    j = C.rest_json(address, f"/jobs/{jid}")
    if restarted_after_ms and restart_ms(j) <= restarted_after_ms:
        return False
    return j["state"] == "RUNNING" and all(v["status"] == "RUNNING" for v in j["vertices"])


def restart_ms(job: dict) -> int:
    """When the JobManager last moved the job into a failover state (epoch ms, 0 = never)."""
    ts = job.get("timestamps") or {}
    return max(int(ts.get(s) or 0) for s in ("RESTARTING", "FAILING"))


def wait_for(pred, timeout_s: float, what: str, every_s: float = 0.1) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if pred():
                return time.monotonic()
        except OSError:
            pass
        time.sleep(every_s)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f}s")


def main(argv: list[str] | None = None) -> int:
    p = C.parser("recovery", __doc__)
    p.add_argument("--rate", type=float, default=100.0, help="events/s produced")
    p.add_argument("--encoder", default="minilm", help="model.text_encoder")
    p.add_argument("--checkpoint-ms", type=int, default=10_000)
    p.add_argument("--settle", type=float, default=15.0, help="s after the first checkpoint")
    p.add_argument("--timeout", type=float, default=300.0, help="s per phase")
    p.add_argument(
        "--spare-taskmanagers", type=int, default=0, help="idle TaskManagers (2 slots each)"
    )
    p.add_argument(
        "--replace",
        choices=("at-kill", "after-recovery"),
        default="at-kill",
        help="when the replacement TaskManager starts: at the kill (on one machine its JVM "
        "start-up then shares the cores with the recovery), or once the job runs again (with "
        "spares, as when the replacement comes up on another machine)",
    )
    p.add_argument("--workdir", default="")
    args = p.parse_args(argv)
    if args.replace == "after-recovery" and args.spare_taskmanagers < 1:
        p.error("--replace after-recovery needs --spare-taskmanagers >= 1 (free slots)")
    if args.quick:
        args.rate, args.encoder, args.settle = 30, "none", 3
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rtrec-bench-recovery-"))
    registry = work / "registry"
    ov = [
        *C.topic_overrides("recovery"),
        f"replay.num_events={int(args.rate * 4 * args.timeout)}",
        "replay.malformed_fraction=0.0",
        f"model.text_encoder='{args.encoder}'",
        "job.parallelism=2",
        f"job.checkpoint_interval_ms={args.checkpoint_ms}",
        f"job.checkpoint_dir='{work / 'checkpoints'}'",
        "job.retain_checkpoints=false",
        "job.restart_attempts=5",
        f"export.registry_dir='{registry}'",
        *args.set,
    ]
    cfg = C.config(ov)
    res: dict[str, Any] = {}
    try:
        with C.embedded_kafka(work) as bootstrap:
            C.create_all_topics(cfg, bootstrap)
            producer = C.LiveProducer(cfg, bootstrap, args.rate, limit_s=1e9)
            producer.start()
            cluster = C.standalone_cluster(work / "cluster", taskmanagers=2, slots=2)
            t0 = time.monotonic()
            address = cluster.start()
            C.log(f"cluster up in {time.monotonic() - t0:.1f}s at {address}; submitting")
            watcher = C.RegistryWatcher(registry, cfg.job.model_key)
            watcher.start()
            try:
                t_submit, t_submit_wall = time.monotonic(), time.time()
                jid = C.submit_to_cluster(address, bootstrap, ov)
                t_run = wait_for(lambda: all_running(address, jid), args.timeout, "cold start")
                wait_for(lambda: watcher.seen, args.timeout, "first version")
                t_first = min(t for t, _ in watcher.seen.values())
                cold = {
                    "running_s": t_run - t_submit,
                    "first_version_s": t_first - t_submit_wall,  # watcher times are wall clock
                }
                C.log(
                    f"cold start: running {cold['running_s']:.1f}s, "
                    f"version {cold['first_version_s']:.1f}s"
                )
                wait_for(
                    lambda: (
                        C.rest_json(address, f"/jobs/{jid}/checkpoints")["counts"]["completed"] >= 1
                    ),
                    args.timeout,
                    "first checkpoint",
                    every_s=0.5,
                )
                for _ in range(args.spare_taskmanagers):
                    cluster.add_taskmanager()
                time.sleep(args.settle)
                seen_before = set(watcher.seen)
                C.log(f"kill -9 TaskManager 0 (and its Python workers); replacement {args.replace}")
                t_kill_wall, t_kill = time.time(), time.monotonic()
                cluster.kill_taskmanager(0)
                if args.replace == "at-kill":
                    cluster.restart_taskmanager(0)
                kill_ms = int(t_kill_wall * 1000)
                # The JobManager's own record of when it started the failover (its clock is
                # this machine's), the first one after the kill: exact, unlike polling a
                # state that may last < 1 s.
                failovers: list[int] = []

                def recovered() -> bool:
                    j = C.rest_json(address, f"/jobs/{jid}")
                    r = restart_ms(j)
                    if r > kill_ms and r not in failovers:
                        failovers.append(r)
                    return bool(failovers) and all_running(address, jid, kill_ms)

                t_back = wait_for(recovered, args.timeout, "recovery")
                if args.replace == "after-recovery":
                    cluster.restart_taskmanager(0)
                t_det_wall = failovers[0] / 1000
                # A version of the restarted job: first seen once its tasks all run again.
                # The failed attempt's trainer, on the surviving TaskManager, can finish one
                # in the moment before the failover cancels it, just after the kill.
                t_back_wall = t_kill_wall + (t_back - t_kill)

                def new_versions() -> list[float]:
                    return [
                        t
                        for n, (t, _) in watcher.seen.items()
                        if n not in seen_before and t >= t_back_wall
                    ]

                wait_for(new_versions, args.timeout, "new version")
                t_new = min(new_versions())
                ck = C.rest_json(address, f"/jobs/{jid}/checkpoints")
                restored = (ck.get("latest") or {}).get("restored") or {}
                rec = {
                    "detected_s": t_det_wall - t_kill_wall,
                    "running_s": t_back - t_kill,
                    "resumed_s": t_new - t_kill_wall,
                    "restored_checkpoint": restored.get("id"),
                    "failovers": len(failovers),
                    "spare_taskmanagers": args.spare_taskmanagers,
                    "replacement": args.replace,
                }
                C.cancel_job(address, jid)
            finally:
                watcher.stop()
                producer.stop()
                cluster.stop()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        {"phase": "cold start (submit ->)", "running_s": cold["running_s"],
         "first_version_s": cold["first_version_s"]},
        {"phase": "recovery (kill -9 ->)", "detected_s": rec["detected_s"],
         "running_s": rec["running_s"], "first_version_s": rec["resumed_s"],
         "running_vs_cold": C.ratio(rec["running_s"], cold["running_s"]),
         "version_vs_cold": C.ratio(rec["resumed_s"], cold["first_version_s"])},
    ]  # fmt: skip
    cols = [
        "phase",
        "detected_s",
        "running_s",
        "first_version_s",
        "running_vs_cold",
        "version_vs_cold",
    ]
    print(C.table(rows, cols))
    headline = (
        f"kill -9 TaskManager ({args.spare_taskmanagers} spare, replacement {args.replace}): "
        f"detected {rec['detected_s']:.1f}s, tasks running {rec['running_s']:.1f}s, "
        f"new version {rec['resumed_s']:.1f}s "
        f"({rows[1]['version_vs_cold']:.2f}x cold start {cold['first_version_s']:.1f}s)"
    )
    print(headline)
    figs = [
        C.figure("failure detected after kill -9", rec["detected_s"], "s"),
        C.figure(
            "all tasks running again after kill -9", rec["running_s"], "s",
            "cold start: submit -> all tasks running", cold["running_s"],
        ),
        C.figure(
            "first new model version after kill -9", rec["resumed_s"], "s",
            "cold start: submit -> first version", cold["first_version_s"], headline=True,
        ),
    ]  # fmt: skip
    res = {"cold_start": cold, "recovery": rec, "rows": rows, "figures": figs}
    C.write_result(args.out, "recovery", args, {**res, "headline": headline}, config=cfg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
