"""Layering: imports flow one way between rtrec's packages, models/ never imports pyflink,
and which of our Python processes import torch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _last_line(code: str) -> str:
    """The last line ``code`` prints, run by a fresh interpreter (nothing imported yet)."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return out.stdout.strip().splitlines()[-1]


# Lowest first: a package may import only packages before it. benchmarks/ and tests/ sit
# above all of them.
LAYERS = ("models", "udfs", "infra", "flink_job", "replay", "offline", "serving", "rtrec")


def _imported_packages(package: str) -> dict[str, set[str]]:
    """Our top-level packages that ``package`` imports (at module level or inside a
    function), each with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in LAYERS and top != package:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_package_is_in_a_layer():
    ours = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert ours == set(LAYERS)


def test_imports_flow_one_way_between_packages():
    upward = [
        f"{f} imports {target}"
        for i, package in enumerate(LAYERS)
        for target, files in _imported_packages(package).items()
        if LAYERS.index(target) > i
        for f in sorted(files)
    ]
    assert upward == []


def test_the_flink_job_does_not_import_the_offline_tools():
    """What a cluster's client process imports to build the graph (--pyFiles ships
    flink_job, infra, udfs, models) needs nothing else."""
    assert set(_imported_packages("flink_job")) <= {"models", "udfs", "infra"}
    assert set(_imported_packages("infra")) == set()


def test_no_pyflink_import_in_models_source():
    offenders = []
    for path in (ROOT / "models").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] in ("pyflink", "udfs", "flink_job")
            ]
    assert offenders == []


def test_importing_models_does_not_load_pyflink():
    code = (
        "import importlib, pkgutil, sys, models\n"
        "for m in pkgutil.iter_modules(models.__path__):\n"
        "    importlib.import_module('models.' + m.name)\n"
        "print(any(k.startswith('pyflink') for k in sys.modules))"
    )
    assert _last_line(code) == "False"


def test_the_parsing_stages_worker_and_serving_do_not_load_torch():
    """Parsing, user windows, the embedding stage (until its first catalogue batch) and the
    registry sink share a Python worker, and serving is its own process: none of them
    imports torch (~2-3 s of CPU per process start, i.e. per worker on every recovery)."""
    code = (
        "import sys, udfs.parse, udfs.user_window, udfs.embed, udfs.publish\n"
        "import models.serving, serving.server\n"
        "print(sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'transformers'}))"
    )
    assert _last_line(code) == "[]"


def test_preload_imports_what_the_first_learner_needs():
    """models.trainer.preload (run in the background when the job's trainer opens) leaves
    the first OnlineLearner almost nothing to import: without it torch.optim's first
    optimizer imports torch._dynamo, hundreds of modules, before the first step."""
    code = (
        "import sys\n"
        "from models.config import ModelConfig, TrainerConfig\n"
        "from models.trainer import OnlineLearner, preload\n"
        "preload()\n"
        "before = set(sys.modules)\n"
        "OnlineLearner(ModelConfig(), TrainerConfig(), text_dim=0)\n"
        "print(len(set(sys.modules) - before))"
    )
    assert int(_last_line(code)) < 20
