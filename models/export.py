"""Model versions: a self-contained ONNX graph plus a manifest.

The graph maps ``history_ids`` int64 [B, H] (indices into the version's item list,
newest first, 0 = padding) and ``history_mask`` bool [B, H] to ``top_ids`` int64 [B, K]
and ``top_scores`` float32 [B, K]. The item matrix is inside the graph, and the item id
strings are in the ONNX metadata (``item_ids``, a JSON list; index i+1 <-> item_ids[i]),
so ``model.onnx`` alone is enough to serve.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass
from typing import Any

import onnx
import torch

from models.trainer import OnlineLearner
from models.two_tower import TopKModel

ONNX_OPSET = 18
MANIFEST_FORMAT = 1


class NonFiniteModelError(RuntimeError):
    """The model holds NaN/inf values; it must not be published."""


@dataclass(frozen=True)
class ModelVersion:
    model_key: str
    version: int
    onnx_bytes: bytes
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        """Directory name: version number plus content hash, unique per content."""
        return f"v{self.version:06d}-{self.manifest['content_hash'][:12]}"


def export_onnx(model: TopKModel, item_ids: list[str]) -> bytes:
    """Trace ``model`` to ONNX with a dynamic batch axis; embed the item id list."""
    model = model.eval()
    h = model.dense.cfg.history_length
    ids = torch.zeros(1, h, dtype=torch.long)
    mask = torch.zeros(1, h, dtype=torch.bool)
    buf = io.BytesIO()
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter is ~40x faster than dynamo here and this graph is static.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (ids, mask),
            buf,  # type: ignore[arg-type]  # file objects are accepted at run time
            input_names=["history_ids", "history_mask"],
            output_names=["top_ids", "top_scores"],
            dynamic_axes={
                "history_ids": batch,
                "history_mask": batch,
                "top_ids": batch,
                "top_scores": batch,
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    proto = onnx.load_from_string(buf.getvalue())
    entry = proto.metadata_props.add()
    entry.key = "item_ids"
    entry.value = json.dumps(item_ids)
    return bytes(proto.SerializeToString())


def build_version(
    learner: OnlineLearner, meta: dict[str, Any], top_k: int, config: dict[str, Any]
) -> ModelVersion:
    """Export the learner's current model as the next version (``meta['version'] + 1``).

    Raises NonFiniteModelError instead of exporting a model with NaN/inf weights.
    """
    table = learner.table
    rows = table.embeddings().detach().to("cpu", torch.float32).clone()  # [V + 1, D]
    dense = learner.model
    if not bool(torch.isfinite(rows).all()) or not all(
        bool(torch.isfinite(p).all()) for p in dense.parameters()
    ):
        raise NonFiniteModelError(
            f"model {meta['model_key']} at step {meta['step']} has non-finite weights; not exported"
        )
    cpu_dense = type(dense)(dense.cfg)
    cpu_dense.load_state_dict({k: v.detach().cpu() for k, v in dense.state_dict().items()})
    onnx_bytes = export_onnx(TopKModel(cpu_dense, rows, top_k), table.ids[1:])
    version = meta["version"] + 1
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "model_key": meta["model_key"],
        "version": version,
        "steps": meta["step"],
        "events_seen": meta["events_seen"],
        "positives_trained": meta["positives_trained"],
        "event_time_hwm_ms": meta["hwm_ts"],
        "num_items": len(table),
        "top_k": min(top_k, len(table)),
        "history_length": dense.cfg.history_length,
        "metrics": {
            "train_loss_ema": _finite_or_none(meta["loss_ema"]),
            "prequential_recall10_ema": _finite_or_none(meta["recall10_ema"]),
            "non_finite_skips": meta["non_finite_skips"],
            "oov_targets": meta["oov"],
        },
        "config": config,
        "content_hash": hashlib.sha256(onnx_bytes).hexdigest(),
    }
    return ModelVersion(meta["model_key"], version, onnx_bytes, manifest)


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
