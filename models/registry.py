"""The model registry directory: immutable version directories plus an atomic LATEST.

Layout::

    <root>/<model_key>/v000007-<hash>/model.onnx
    <root>/<model_key>/v000007-<hash>/manifest.json
    <root>/<model_key>/LATEST            # contains "v000007-<hash>"
    <root>/<model_key>/revoked/<name>.json   # why a version must not serve again
    <root>/<model_key>/rollbacks/<ms>-<name>.json  # who moved LATEST back, and why
    <root>/<model_key>/PIN               # set by `rtrec rollback`: LATEST stays put

A version directory is written under a temporary name and renamed into place, so a
reader never sees a half-written version; LATEST is replaced atomically. Published
versions (manifest ``publication.status``, models/gate.py) move LATEST forward only (a
lower version number never replaces a higher one); held versions are stored but never
move it, nor does anything while the key is pinned or a revoked version. Names carry a
content hash, so a version re-made with other content after a failure (possible outside
deterministic mode) gets a directory of its own and takes LATEST; nothing is ever
rewritten in place. Only a revocation or a rollback moves LATEST back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

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
    revoked = (key_dir / "revoked" / f"{mv.name}.json").exists()
    if status(mv.manifest) == "published" and not _pinned(key_dir) and not revoked:
        _advance_latest(key_dir, mv.name, remade_ok=not existed)
    return final


def status(manifest: dict[str, Any]) -> str:
    """A version's publication status: "published" or "held" (models/gate.py);
    manifests from before the gate are published."""
    return str(manifest.get("publication", {}).get("status", "published"))


def _pinned(key_dir: Path) -> bool:
    return (key_dir / "PIN").exists()


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically (fsynced temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(doc, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _current(key_dir: Path) -> str:
    try:
        return (key_dir / "LATEST").read_text().strip()
    except FileNotFoundError:
        return ""


def _set_latest(key_dir: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".LATEST-", dir=key_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(name + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, key_dir / "LATEST")


def revoke(root: str | Path, record: dict[str, Any]) -> bool:
    """Apply a revocation record (models.gate.Revocation.record): remember that
    ``record["revoked"]`` must not serve again and, if it is LATEST and the key is not
    pinned, move LATEST to ``record["rollback_to"]``. Idempotent (a replay rewrites the
    same record); True when LATEST moved."""
    key_dir = Path(root) / _safe_key(record["model_key"])
    revoked, to = record["revoked"], record["rollback_to"]
    for name in (revoked, to):
        version_number(name)  # a malformed record must not name paths
    _write_json(key_dir / "revoked" / f"{revoked}.json", record)
    if _current(key_dir) != revoked or _pinned(key_dir) or not (key_dir / to).is_dir():
        return False
    _set_latest(key_dir, to)
    return True


def revoked_names(root: str | Path, model_key: str) -> set[str]:
    d = Path(root) / _safe_key(model_key) / "revoked"
    return {p.stem for p in d.glob("v*.json")} if d.is_dir() else set()


def manifest_of(root: str | Path, model_key: str, name: str) -> dict[str, Any]:
    p = Path(root) / _safe_key(model_key) / name / "manifest.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def rollback(
    root: str | Path, model_key: str, to: str | None, by: str, reason: str
) -> dict[str, Any]:
    """Move LATEST back to ``to`` (a version name or number; None = the newest published,
    unrevoked version below LATEST), revoke the version it replaces and pin the key so
    that newer published versions do not take LATEST until :func:`release`. Returns the
    rollback record (also written under ``rollbacks/``). ValueError says what is wrong."""
    key_dir = Path(root) / _safe_key(model_key)
    current = _current(key_dir)
    if not current:
        raise ValueError(f"{key_dir} has no LATEST: nothing is serving, nothing to roll back")
    names = list_versions(root, model_key)
    gone = revoked_names(root, model_key)
    if to is None:
        older = [
            n
            for n in names
            if version_number(n) < version_number(current)
            and n not in gone
            and status(manifest_of(root, model_key, n)) == "published"
        ]
        if not older:
            raise ValueError(f"{model_key}: no published, unrevoked version below {current}")
        target = older[-1]
    else:
        matches = [n for n in names if n == to or (to.isdigit() and version_number(n) == int(to))]
        if not matches:
            raise ValueError(
                f"{model_key} has no version {to!r}; `rtrec versions {model_key}` lists them"
            )
        target = matches[-1]
    if target == current:
        raise ValueError(f"{model_key}: {target} is already serving")
    now_ms = int(time.time() * 1000)
    record = {
        "kind": "rollback",
        "model_key": model_key,
        "from": current,
        "to": target,
        "by": by,
        "reason": reason,
        "at_ms": now_ms,
    }
    _write_json(key_dir / "rollbacks" / f"{now_ms}-{current}.json", record)
    _write_json(
        key_dir / "revoked" / f"{current}.json",
        {**record, "kind": "revocation", "revoked": current, "rollback_to": target},
    )
    _write_json(key_dir / "PIN", {"name": target, "by": by, "reason": reason, "at_ms": now_ms})
    _set_latest(key_dir, target)
    return record


def release(root: str | Path, model_key: str) -> str | None:
    """Unpin the key: LATEST moves to the newest published, unrevoked version (returned;
    None when there is none, and LATEST stays)."""
    key_dir = Path(root) / _safe_key(model_key)
    (key_dir / "PIN").unlink(missing_ok=True)
    gone = revoked_names(root, model_key)
    ok = [
        n
        for n in list_versions(root, model_key)
        if n not in gone and status(manifest_of(root, model_key, n)) == "published"
    ]
    if not ok:
        return None
    _set_latest(key_dir, ok[-1])
    return ok[-1]


def version_table(root: str | Path, model_key: str) -> list[dict[str, Any]]:
    """One row per stored version, oldest first: name, version, status (published, held,
    revoked), whether it is LATEST, the gate's reason and figures and the prequential
    Recall@K when it was exported."""
    key_dir = Path(root) / _safe_key(model_key)
    current, gone = _current(key_dir), revoked_names(root, model_key)
    rows = []
    for name in list_versions(root, model_key):
        m = manifest_of(root, model_key, name)
        pub = m.get("publication", {})
        cum = m.get("metrics", {}).get("prequential", {}).get("cumulative", {})
        k = m.get("metrics", {}).get("prequential", {}).get("k", 10)
        rows.append(
            {
                "name": name,
                "version": version_number(name),
                "status": "revoked" if name in gone else status(m),
                "latest": name == current,
                "steps": m.get("steps"),
                "events_seen": m.get("events_seen"),
                f"recall@{k}": cum.get(f"recall@{k}"),
                "candidate_recall": pub.get("candidate_recall"),
                "serving_recall": pub.get("serving_recall"),
                "reason": pub.get("reason", ""),
            }
        )
    return rows


def _advance_latest(key_dir: Path, name: str, remade_ok: bool) -> None:
    current = _current(key_dir)
    # Never back to a lower number. The same number with other content, written just now, is
    # a version re-made after a failure (outside deterministic mode): the surviving run goes
    # on from it. Re-publishing an existing directory (a replay, or a zombie task of the
    # failed attempt) only moves LATEST to a higher number.
    if current:
        have, new = version_number(current), version_number(name)
        if current == name or have > new or (have == new and not remade_ok):
            return
    _set_latest(key_dir, name)


def list_versions(root: str | Path, model_key: str) -> list[str]:
    key_dir = Path(root) / _safe_key(model_key)
    if not key_dir.is_dir():
        return []
    names = [p.name for p in key_dir.iterdir() if p.is_dir() and _VERSION_RE.match(p.name)]
    return sorted(names, key=version_number)
