"""Layering: models/ never imports pyflink, and which of our Python processes import torch."""

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
