"""Serving: load a model version with onnxruntime and hot-swap when LATEST moves."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from models.registry import read_latest

log = logging.getLogger(__name__)
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]


def providers(gpu: bool | None = None) -> list[str]:
    """CUDA first when a GPU is usable, CPU always (onnxruntime-gpu lists CUDA even without
    one). ``gpu``: None = whether torch sees a CUDA device, False = the CPU only."""
    if gpu is None:
        try:
            import torch

            gpu = torch.cuda.is_available()
        except Exception:
            gpu = False
    avail = ort.get_available_providers()
    chosen = ["CUDAExecutionProvider"] if gpu and "CUDAExecutionProvider" in avail else []
    return [*chosen, "CPUExecutionProvider"]


class OnnxRecommender:
    """One loaded ONNX version: item-id histories in, top-k item ids out."""

    def __init__(self, onnx_path: str | Path, gpu: bool | None = None) -> None:
        """``gpu``: as :func:`providers` (None: CUDA when present)."""
        self.path = Path(onnx_path)
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), opts, providers=providers(gpu))
        meta = self.session.get_modelmeta().custom_metadata_map
        if "item_ids" not in meta:
            raise ValueError(f"{self.path} has no 'item_ids' metadata; was it exported by rtrec?")
        self.item_ids: list[str] = json.loads(meta["item_ids"])
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}
        self.history_length = int(self.session.get_inputs()[0].shape[1])
        manifest = self.path.parent / "manifest.json"
        self.manifest: dict[str, Any] = (
            json.loads(manifest.read_text()) if manifest.is_file() else {}
        )

    def encode(self, histories: list[list[str]]) -> tuple[IntArray, BoolArray]:
        """Histories (oldest -> newest item ids) -> (ids [B, H] newest first, mask [B, H])."""
        h = self.history_length
        ids = np.zeros((len(histories), h), dtype=np.int64)
        for i, hist in enumerate(histories):
            known = [self.index[x] for x in hist if x in self.index]
            recent = known[-h:][::-1]
            ids[i, : len(recent)] = recent
        return ids, ids > 0

    def encode_excluded(
        self, histories: list[list[str]], exclude: list[list[str]] | None = None
    ) -> IntArray:
        """The ``exclude_ids`` input [B, E]: every item of each history (not only the last
        H the model reads) plus the caller's ``exclude`` items, 0-padded; unknown ids are
        skipped (they cannot be recommended anyway)."""
        rows = [
            [self.index[x] for x in (*hist, *(exclude[i] if exclude else ())) if x in self.index]
            for i, hist in enumerate(histories)
        ]
        out = np.zeros((len(rows), max([1, *map(len, rows)])), dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = row
        return out

    def raw(
        self, ids: IntArray, mask: BoolArray, exclude_ids: IntArray | None = None
    ) -> tuple[IntArray, FloatArray]:
        """The graph's outputs (top_ids [B, K], top_scores [B, K]) for encoded inputs;
        ``exclude_ids`` [B, E] defaults to nothing beyond ``ids``."""
        if exclude_ids is None:
            exclude_ids = np.zeros((len(ids), 1), dtype=np.int64)
        feeds = {"history_ids": ids, "history_mask": mask, "exclude_ids": exclude_ids}
        top_ids, top_scores = self.session.run(None, feeds)
        return top_ids, top_scores

    def recommend(
        self, histories: list[list[str]], k: int = 10, exclude: list[list[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        """Top-k (item id, score) per history (oldest -> newest ids). Nothing in a
        user's history is recommended, however long it is, nor any of ``exclude[i]``."""
        ids, mask = self.encode(histories)
        top_ids, top_scores = self.raw(ids, mask, self.encode_excluded(histories, exclude))
        return [
            [
                (self.item_ids[int(i) - 1], float(s))
                for i, s in zip(row_i[:k], row_s[:k], strict=True)
            ]
            for row_i, row_s in zip(top_ids, top_scores, strict=True)
        ]


class HotSwapRecommender:
    """Follows ``<registry>/<model_key>/LATEST`` and swaps sessions atomically."""

    def __init__(self, registry: str | Path, model_key: str) -> None:
        self.registry = Path(registry)
        self.model_key = model_key
        self._lock = threading.Lock()
        self.current: OnnxRecommender | None = None
        self.version_name: str | None = None

    def refresh(self) -> bool:
        """Load LATEST if it moved; True when a new version was swapped in."""
        name = read_latest(self.registry, self.model_key)
        if name is None or name == self.version_name:
            return False
        rec = OnnxRecommender(self.registry / self.model_key / name / "model.onnx")
        with self._lock:
            self.current, self.version_name = rec, name
        log.info("serving %s/%s (%d items)", self.model_key, name, len(rec.item_ids))
        return True

    def recommend(
        self, histories: list[list[str]], k: int = 10, exclude: list[list[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        with self._lock:
            rec = self.current
        if rec is None:
            raise RuntimeError(
                f"no model version published yet under {self.registry}/{self.model_key}; "
                "is the job running and has it trained?"
            )
        return rec.recommend(histories, k, exclude)
