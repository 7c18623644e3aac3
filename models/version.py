"""One published model version: what the trainer exports and the sinks write.

Kept apart from ``models.export`` (torch, onnx) so that the processes that only move
versions around (the registry sink's Python worker, serving) do not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelVersion:
    """``onnx_bytes``: the top-k ranking graph; ``manifest``: its JSON metadata (version,
    content hash, event-time high-water mark, metrics...)."""

    model_key: str
    version: int
    onnx_bytes: bytes
    manifest: dict[str, Any]
    # Extra files of the version directory (user encoder graph, item matrix for ANN serving).
    extras: dict[str, bytes] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Directory name: version number plus content hash, unique per content."""
        return f"v{self.version:06d}-{self.manifest['content_hash'][:12]}"
