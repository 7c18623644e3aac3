"""Model-version sinks: the registry directory and the Kafka ``models`` record format.

A version row is either a model version (its manifest's ``publication.status`` says
published or held, models/gate.py) or a revocation (``kind`` = "revocation", no graph).
"""

from __future__ import annotations

import base64
import json
import logging
import pickle

from pyflink.datastream import MapFunction

from models.registry import publish, revoke, status
from models.version import ModelVersion

log = logging.getLogger(__name__)


def _version(row: tuple) -> ModelVersion:
    manifest = json.loads(row[2])
    extras = pickle.loads(row[4]) if row[4] else {}
    return ModelVersion(row[0], int(manifest["version"]), row[3], manifest, extras)


class PublishToRegistry(MapFunction):
    """Writes each version into the registry directory; emits a one-line JSON status."""

    def __init__(self, registry_dir: str) -> None:
        self.registry_dir = registry_dir

    def map(self, value):
        doc = json.loads(value[2])
        if doc.get("kind") == "revocation":
            moved = revoke(self.registry_dir, doc)
            log.warning(
                "revoked %s/%s, %s: %s",
                doc["model_key"],
                doc["revoked"],
                f"LATEST back to {doc['rollback_to']}" if moved else "LATEST unchanged",
                doc["reason"],
            )
            return json.dumps(
                {"revoked": doc["revoked"], "rollback_to": doc["rollback_to"], "moved": moved}
            )
        mv = _version(value)
        path = publish(self.registry_dir, mv)
        m = mv.manifest
        st = status(m)
        reason = m.get("publication", {}).get("reason", "")
        log.info(
            "%s %s/%s (steps=%s events=%s%s)",
            st,
            mv.model_key,
            mv.name,
            m["steps"],
            m["events_seen"],
            f": {reason}" if st != "published" else "",
        )
        return json.dumps(
            {
                "path": str(path),
                "status": st,
                "version": mv.version,
                "events_seen": m["events_seen"],
            }
        )


def to_kafka_record(row: tuple) -> str:
    """The ``models`` topic record. ``type`` tells them apart: "version" (``status``
    published or held; manifest fields + name + base64 ONNX bytes; consumers serve only
    published ones) or "revocation" (``name`` must no longer serve, ``rollback_to``
    does; the record in ``revocation``)."""
    doc = json.loads(row[2])
    if doc.get("kind") == "revocation":
        return json.dumps(
            {
                "type": "revocation",
                "model_key": row[0],
                "name": row[1],
                "rollback_to": doc["rollback_to"],
                "revocation": doc,
            }
        )
    return json.dumps(
        {
            "type": "version",
            "status": status(doc),
            "model_key": row[0],
            "name": row[1],
            "manifest": doc,
            "onnx_base64": base64.b64encode(row[3]).decode("ascii"),
        }
    )
