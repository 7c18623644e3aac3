"""README.md stays short, its links resolve, it names every subcommand, and its onnxruntime
snippet (the block after ``<!-- tested: tests/unit/test_readme.py -->``) really reads the
newest version of a registry written by the project's own export code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARKER = "<!-- tested: tests/unit/test_readme.py -->"
# [text](target) and ![alt](target); a target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
# The registry path in the snippet, replaced by the test registry's.
SNIPPET_REGISTRY = 'Path(".rtrec/registry")'


def readme() -> str:
    return README.read_text(encoding="utf-8")


def readme_snippet() -> str:
    text = readme()
    assert text.count(MARKER) == 1, f"README.md needs exactly one {MARKER}"
    after = text.split(MARKER, 1)[1]
    m = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
    assert m, f"a ```python block must follow {MARKER}"
    return m.group(1)


def test_readme_is_at_most_300_lines():
    n = len(readme().splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/"


def _slug(heading: str) -> str:
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def test_links_stay_in_the_repository_and_exist():
    text = readme()
    anchors = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}
    targets = LINK.findall(text)
    assert targets, "no links found: the link pattern is broken"
    problems = []
    for target in targets:
        if target.startswith("#"):
            if target[1:] not in anchors:
                problems.append(f"{target}: no such heading")
            continue
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("/"):
            problems.append(f"{target}: not a relative link into the repository")
            continue
        if ".." in Path(target).parts:
            problems.append(f"{target}: points outside the repository")
            continue
        path = (ROOT / target.split("#", 1)[0]).resolve()
        if not path.is_relative_to(ROOT):
            problems.append(f"{target}: points outside the repository")
        elif not path.exists():
            problems.append(f"{target}: does not exist")
    assert not problems, "README.md links:\n" + "\n".join(problems)


def test_readme_names_every_subcommand():
    from rtrec.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    names = sorted(sub.choices)
    assert len(names) >= 14, names
    text = readme()
    missing = [n for n in names if f"`rtrec {n}" not in text]
    assert not missing, f"README.md does not name: {', '.join(missing)}"


def test_readme_has_the_figures_markers():
    text = readme()
    start, end = text.find("<!-- figures:start -->"), text.find("<!-- figures:end -->")
    assert 0 <= start < end, "the figures table must sit between its two markers"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A registry with two versions of a tiny untrained model (id embeddings only) over a
    catalogue of 40 items, written by the job's own export and registry code."""
    import torch

    from models.config import ModelConfig, TrainerConfig
    from models.events import Item
    from models.export import build_version
    from models.registry import publish
    from models.trainer import OnlineLearner, new_meta

    learner = OnlineLearner(
        ModelConfig(dim=8, history_length=4, hidden=16), TrainerConfig(), torch.device("cpu")
    )
    meta = new_meta("default")
    catalogue = [f"i{n}" for n in range(40)]
    learner.ingest_items([Item(i, f"item {i}", "", (), 1000) for i in catalogue], meta, None)
    root = tmp_path_factory.mktemp("registry")
    older = build_version(learner, meta, top_k=20, config={})
    meta["version"] = older.manifest["version"]
    newer = build_version(learner, meta, top_k=20, config={})
    publish(root, older)
    publish(root, newer)
    return root, catalogue, newer


def test_snippet_recommends_catalogue_items_from_the_latest_version(registry):
    from models.serving import OnnxRecommender

    root, catalogue, newest = registry
    code = readme_snippet()
    assert code.count(SNIPPET_REGISTRY) == 1, f"the snippet must read {SNIPPET_REGISTRY}"
    scope: dict = {}
    exec(compile(code.replace(SNIPPET_REGISTRY, f"Path({str(root)!r})"), "README", "exec"), scope)

    assert scope["version"].name == newest.name  # the one LATEST names, not the older one
    history, recommended = scope["history"], scope["recommended"]
    assert history and set(history) <= set(catalogue)  # the example ids exist here
    assert len(recommended) == 10 and len(set(recommended)) == 10
    assert set(recommended) <= set(catalogue), recommended
    assert not set(recommended) & set(history)
    # The same model input (indices, newest first, 0-padded) and the same items, in the same
    # order, as the project's serving code.
    rec = OnnxRecommender(root / "default" / newest.name / "model.onnx")
    ids, _ = rec.encode([history])
    assert scope["ids"].tolist() == ids.tolist()
    assert recommended == [item for item, _ in rec.recommend([history], k=10)[0]]
