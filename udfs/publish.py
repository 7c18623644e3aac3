"""Model-version sinks: the registry directory and the Kafka ``models`` record format."""

from __future__ import annotations

import base64
import json
import logging
import pickle

from pyflink.datastream import MapFunction

from models.registry import publish
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
        mv = _version(value)
        path = publish(self.registry_dir, mv)
        m = mv.manifest
        log.info(
            "published %s/%s (steps=%s events=%s)",
            mv.model_key,
            mv.name,
            m["steps"],
            m["events_seen"],
        )
        return json.dumps(
            {"published": str(path), "version": mv.version, "events_seen": m["events_seen"]}
        )


def to_kafka_record(row: tuple) -> str:
    """The ``models`` topic record: manifest fields + name + base64 ONNX bytes."""
    manifest = json.loads(row[2])
    return json.dumps(
        {
            "model_key": row[0],
            "name": row[1],
            "manifest": manifest,
            "onnx_base64": base64.b64encode(row[3]).decode("ascii"),
        }
    )
