"""job.jvm_options reach the JVM of a local run (PyFlink's gateway, which hosts the
mini-cluster). Each case starts its own Python process: a JVM keeps the options it
started with, and the test process's JVM may already be running."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = """
import json, sys
from flink_job.config import load_config
from flink_job.job import make_env
from pyflink.java_gateway import get_gateway
make_env(load_config(None, sys.argv[1:]))
bean = get_gateway().jvm.java.lang.management.ManagementFactory.getRuntimeMXBean()
print(json.dumps(list(bean.getInputArguments())))
"""


def _jvm_args(*overrides: str, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, *overrides],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_the_local_jvm_runs_with_job_jvm_options():
    env = {k: v for k, v in os.environ.items() if k != "JVM_ARGS"}
    args = _jvm_args(env=env)
    assert "-XX:TieredStopAtLevel=1" in args and "-XX:+UseSerialGC" in args
    mine = _jvm_args("job.jvm_options='-XX:+UseParallelGC'", env=env)
    assert "-XX:+UseParallelGC" in mine and "-XX:TieredStopAtLevel=1" not in mine
    assert "-XX:TieredStopAtLevel=1" not in _jvm_args("job.jvm_options=''", env=env)
    # Flink's own JVM_ARGS, set by the user, wins.
    theirs = _jvm_args(env={**env, "JVM_ARGS": "-XX:+UseParallelGC"})
    assert "-XX:+UseParallelGC" in theirs and "-XX:TieredStopAtLevel=1" not in theirs
