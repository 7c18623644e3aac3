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

from models.registry import read_latest, version_number

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

    def __init__(
        self,
        onnx: str | Path | bytes,
        gpu: bool | None = None,
        threads: int = 0,
        manifest: dict[str, Any] | None = None,
    ) -> None:
        """``onnx``: a ``model.onnx`` path (its directory's ``manifest.json`` is read) or
        the graph's bytes; ``gpu``: as :func:`providers` (None: CUDA when present);
        ``threads``: onnxruntime intra-op threads (0 = its default, one per core)."""
        self.path = Path(onnx) if not isinstance(onnx, bytes) else Path("<bytes>")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        model = onnx if isinstance(onnx, bytes) else str(self.path)
        self.session = ort.InferenceSession(model, opts, providers=providers(gpu))
        meta = self.session.get_modelmeta().custom_metadata_map
        if "item_ids" not in meta:
            raise ValueError(f"{self.path} has no 'item_ids' metadata; was it exported by rtrec?")
        self.item_ids: list[str] = json.loads(meta["item_ids"])
        self.index = {item: i + 1 for i, item in enumerate(self.item_ids)}
        self.history_length = int(self.session.get_inputs()[0].shape[1])
        if manifest is None and isinstance(onnx, bytes):
            manifest = {}
        elif manifest is None:
            file = self.path.parent / "manifest.json"
            manifest = json.loads(file.read_text()) if file.is_file() else {}
        self.manifest: dict[str, Any] = manifest

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


def probe(rec: OnnxRecommender) -> None:
    """Raise ValueError unless ``rec`` answers a fixed probe batch (built from its own item
    list, so it is the same on every run) with finite scores and in-range indices."""
    ids, h = rec.item_ids, rec.history_length
    histories: list[list[str]] = [[], ids[:1], ids[:h], ids[-h:]]
    enc, mask = rec.encode(histories)
    top_ids, top_scores = rec.raw(enc, mask, rec.encode_excluded(histories))
    if not np.isfinite(top_scores).all():
        raise ValueError("the probe batch got non-finite scores")
    if top_ids.size and (int(top_ids.min()) < 1 or int(top_ids.max()) > len(ids)):
        raise ValueError(f"the probe batch got item indices outside 1..{len(ids)}")


class HotSwapRecommender:
    """Follows ``<registry>/<model_key>/LATEST`` and swaps sessions atomically.

    A new version serves only once it has loaded and answered :func:`probe`; until then,
    and if it fails, the serving one stays (``load_failures`` counts the failures, and a
    failed version is not retried until LATEST names another). The version it replaced
    stays loaded, so a rollback to it (LATEST moving back) swaps at once.
    """

    def __init__(self, registry: str | Path, model_key: str, threads: int = 0) -> None:
        self.registry = Path(registry)
        self.model_key = model_key
        self.threads = threads
        self._lock = threading.Lock()
        self.current: OnnxRecommender | None = None
        self.version_name: str | None = None
        self.previous: tuple[str, OnnxRecommender] | None = None
        self.swaps = 0
        self.rollbacks = 0
        self.load_failures = 0
        self.loaded_at = 0.0  # wall time the serving version's files were written
        self._failed: str | None = None

    def refresh(self) -> bool:
        """Load LATEST if it moved; True when a new version was swapped in."""
        name = read_latest(self.registry, self.model_key)
        if name is None or name == self.version_name or name == self._failed:
            return False
        path = self.registry / self.model_key / name / "model.onnx"
        if self.previous is not None and self.previous[0] == name:
            rec = self.previous[1]
        else:
            try:
                rec = OnnxRecommender(path, threads=self.threads)
                probe(rec)
            except Exception:
                self.load_failures += 1
                self._failed = name
                log.exception(
                    "version %s/%s failed to load or probe; still serving %s",
                    self.model_key,
                    name,
                    self.version_name,
                )
                return False
        back = self.version_name is not None and version_number(name) < version_number(
            self.version_name
        )
        with self._lock:
            if self.current is not None and self.version_name is not None:
                self.previous = (self.version_name, self.current)
            self.current, self.version_name = rec, name
            self.swaps += 1
            self.rollbacks += int(back)
            self.loaded_at = path.stat().st_mtime
        log.info(
            "serving %s/%s (%d items)%s",
            self.model_key,
            name,
            len(rec.item_ids),
            " after a rollback" if back else "",
        )
        return True

    def recommend(
        self, histories: list[list[str]], k: int = 10, exclude: list[list[str]] | None = None
    ) -> list[list[tuple[str, float]]]:
        return self.serving().recommend(histories, k, exclude)

    def serving(self) -> OnnxRecommender:
        """The version serving now; RuntimeError when none has been published."""
        return self.snapshot()[1]

    def snapshot(self) -> tuple[str, OnnxRecommender]:
        """(name, loaded version) serving now, read together; RuntimeError when none has
        been published."""
        with self._lock:
            name, rec = self.version_name, self.current
        if rec is None or name is None:
            raise RuntimeError(
                f"no model version published yet under {self.registry}/{self.model_key}; "
                "is the job running and has it trained?"
            )
        return name, rec
