"""constraints.txt pins a dependency set that satisfies pyproject.toml, and every install
path (Makefile, Dockerfile) uses it.

Without it a fresh machine's pip backtracked for over ten minutes through apache-beam and
transformers releases; with it the install is the set the tests ran with.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", (
            f"constraints.txt line {n}: {line!r} is not an exact pin (name==version)"
        )
        pins[canonicalize_name(req.name)] = specs[0].version
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_within_its_range():
    pins = _pins()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue  # not for this platform (e.g. onnxruntime off Linux x86-64)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's "
            f"{req.specifier}; regenerate constraints.txt (see its header)"
        )


def test_installs_use_the_constraints():
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt", make)
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^;\n]*", dockerfile)
    project = [i for i in installs if "apache-flink==" in i or "torch" in i]
    assert project and all("-c constraints.txt" in i for i in project), project
    # The image pins its base image's Flink release, so it drops the constraints' one.
    assert "grep -v '^apache-flink==' constraints.txt" in dockerfile


def test_kafka_python_verifies_checksums_in_c():
    """kafka-python checks a CRC32C over every record batch it reads or writes. Without the
    crc32c extension (pyproject: kafka-python[crc32c]) it falls back to pure Python: ~0.5 s
    of CPU per 2.7 MB model version, more than the job's own CPU for the freshness
    benchmark's read_committed consumer on 2 cores."""
    import crc32c
    from kafka.record import util

    data = bytes(range(256)) * 4096
    assert util.calc_crc32c(data) == crc32c.crc32c(data)
    assert util.calc_crc32c.__defaults__ == (crc32c.crc32c,), (
        "kafka-python checks CRCs with its pure-Python fallback: pip install 'kafka-python[crc32c]'"
    )
