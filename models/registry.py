"""The model registry directory: immutable version directories plus an atomic LATEST.

Layout::

    <root>/<model_key>/v000007-<hash>/model.onnx
    <root>/<model_key>/v000007-<hash>/manifest.json
    <root>/<model_key>/LATEST            # contains "v000007-<hash>"

A version directory is written under a temporary name and renamed into place, so a
reader never sees a half-written version; LATEST is replaced atomically and only moves
forward (a lower version number never replaces a higher one). Names carry a content hash,
so a version re-made with other content after a failure (possible outside deterministic
mode) gets a directory of its own and takes LATEST; nothing is ever rewritten in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from models.version import ModelVersion

_VERSION_RE = re.compile(r"^v(\d{6,})-[0-9a-f]+$")


def _safe_key(model_key: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,128}", model_key) or model_key in (".", ".."):
        raise ValueError(
            f"model key {model_key!r} is not usable as a directory name; use letters, digits, . _ -"
        )
    return model_key


def version_number(name: str) -> int:
    m = _VERSION_RE.match(name)
    if not m:
        raise ValueError(f"{name!r} is not a version directory name (vNNNNNN-hash)")
    return int(m.group(1))


def read_latest(root: str | Path, model_key: str) -> str | None:
    p = Path(root) / _safe_key(model_key) / "LATEST"
    try:
        name = p.read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def publish(root: str | Path, mv: ModelVersion) -> Path:
    """Write ``mv`` (idempotent: an existing identical version is left as it is)."""
    key_dir = Path(root) / _safe_key(mv.model_key)
    key_dir.mkdir(parents=True, exist_ok=True)
    final = key_dir / mv.name
    existed = final.exists()
    if not existed:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{mv.name}-", dir=key_dir))
        try:
            (tmp / "model.onnx").write_bytes(mv.onnx_bytes)
            for name, data in mv.extras.items():
                (tmp / name).write_bytes(data)
            (tmp / "manifest.json").write_text(json.dumps(mv.manifest, indent=2, sort_keys=True))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _advance_latest(key_dir, mv.name, remade_ok=not existed)
    return final


def _advance_latest(key_dir: Path, name: str, remade_ok: bool) -> None:
    latest = key_dir / "LATEST"
    try:
        current = latest.read_text().strip()
    except FileNotFoundError:
        current = ""
    # Never back to a lower number. The same number with other content, written just now, is
    # a version re-made after a failure (outside deterministic mode): the surviving run goes
    # on from it. Re-publishing an existing directory (a replay, or a zombie task of the
    # failed attempt) only moves LATEST to a higher number.
    if current:
        have, new = version_number(current), version_number(name)
        if current == name or have > new or (have == new and not remade_ok):
            return
    fd, tmp = tempfile.mkstemp(prefix=".LATEST-", dir=key_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, latest)


def list_versions(root: str | Path, model_key: str) -> list[str]:
    key_dir = Path(root) / _safe_key(model_key)
    if not key_dir.is_dir():
        return []
    names = [p.name for p in key_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
    return sorted(names, key=version_number)
