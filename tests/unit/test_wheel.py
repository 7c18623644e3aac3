"""The wheel works on its own: built from the sources, installed into a fresh virtualenv and
run from outside the repository, it has its package data and a working `rtrec` command.

The virtualenv sees the system site-packages (apache-flink, torch, ... are not reinstalled),
where the repository may also be installed editable; the venv's own copy of rtrec must win,
which the test checks by where ``flink_job`` is imported from.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROFILES = sorted(p.name for p in (ROOT / "flink_job" / "profiles").glob("*.toml"))
JAVA = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "flink_job" / "java").rglob("*.java"))

# Never the network: the build uses the installed setuptools, the install the wheel file.
_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")},
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PIP_NO_INDEX": "1",
    "PYTHONNOUSERSITE": "1",
}


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, env=_ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(cmd: list[str], cwd: Path, timeout: float = 120) -> str:
    r = _run(cmd, cwd, timeout)
    assert r.returncode == 0, f"{cmd} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Build the wheel from a copy of the sources (the checkout gets no build/ or egg-info
    from it), install it into a --system-site-packages venv; the wheel and the venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".git", ".rtrec", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "runs"
        ),
    )
    dist = tmp / "dist"
    _ok(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            dist,
            ".",
        ],
        src,
        timeout=300,
    )
    wheels = list(dist.glob("rtrec-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    # No pip of its own: the system's pip (visible through --system-site-packages) installs
    # into the venv when run by the venv's interpreter.
    _ok([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], tmp)
    python = venv / "bin" / "python"
    _ok([python, "-m", "pip", "install", "--no-deps", "--force-reinstall", wheels[0]], tmp)
    outside = tmp / "elsewhere"
    outside.mkdir()
    return {"wheel": wheels[0], "venv": venv, "python": python, "cwd": outside}


def test_wheel_holds_the_package_data_and_nothing_else(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    assert PROFILES, "no profiles in the checkout"
    for name in PROFILES:
        assert f"flink_job/profiles/{name}" in names
    assert JAVA, "no Java sources in the checkout"
    assert set(JAVA) <= names
    tops = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert tops == {"rtrec", "flink_job", "udfs", "models", "infra", "replay", "offline", "serving"}
    assert not any(n.endswith(".pyc") for n in names)


def test_venv_imports_its_own_install(installed):
    """Outside the repository the venv's copy shadows any editable install of the checkout."""
    code = (
        "import flink_job, infra.jars as j, rtrec.cli as c; "
        "print(flink_job.__file__); print(j.JAVA_SOURCES); print(c.__file__)"
    )
    out = _ok([installed["python"], "-c", code], installed["cwd"]).split("\n")
    site = installed["venv"].resolve()
    pkg, java, cli = (Path(x).resolve() for x in out[:3])
    for p in (pkg, java, cli):
        assert p.is_relative_to(site), f"{p} is not inside the venv {site}"
    # The operator jar build compiles these: they must be in the installed package.
    assert sorted(p.name for p in java.rglob("*.java")) == sorted(Path(x).name for x in JAVA)
    assert sorted(p.name for p in (pkg.parent / "profiles").glob("*.toml")) == PROFILES


def test_rtrec_help_and_config(installed):
    rtrec = str(installed["venv"] / "bin" / "rtrec")
    out = _ok([rtrec, "--help"], installed["cwd"])
    for name in ("setup", "config", "kafka", "run", "submit", "serve", "bench"):
        assert name in out
    cfg = tomllib.loads(_ok([rtrec, "config"], installed["cwd"]))
    assert {"job", "trainer", "kafka", "export"} <= cfg.keys()


def _contains(big: dict[str, Any], small: dict[str, Any], where: str = "") -> None:
    for k, v in small.items():
        assert k in big, f"{where}{k} missing"
        if isinstance(v, dict):
            _contains(big[k], v, f"{where}{k}.")
        else:
            assert big[k] == v, f"{where}{k}: {big[k]!r} != {v!r}"


def test_rtrec_config_resolves_a_profile_name_from_the_installed_package(installed):
    rtrec = str(installed["venv"] / "bin" / "rtrec")
    cfg = tomllib.loads(_ok([rtrec, "config", "--config", "low-latency"], installed["cwd"]))
    profile = tomllib.loads((ROOT / "flink_job" / "profiles" / "low-latency.toml").read_text())
    _contains(cfg, profile)


def test_rtrec_bench_outside_a_checkout_fails_cleanly(installed):
    r = _run([str(installed["venv"] / "bin" / "rtrec"), "bench"], installed["cwd"])
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "needs a source checkout" in r.stderr
    assert "Traceback" not in r.stderr
