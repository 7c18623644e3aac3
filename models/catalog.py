"""Every item the model knows: from the catalogue stream and/or from events.

Each entry has a persistent index (its position in the exported item list, and the unit
of negative sampling), a frozen text embedding from the language model (zeros when the
item has no text), hashed category ids, how often it was a training target, and when it
was last seen (event time). In Flink each entry is one MapState value
(:meth:`Catalog.pack`); this object is the cache rebuilt from that state.

The learned id embedding is separate (``ItemTable``): an item gets its own id row only
after ``admission_threshold`` interactions and loses it after ``expiry_ms`` without one,
so id state stays bounded while text keeps every item recommendable.
"""

from __future__ import annotations

import heapq
import struct
from collections.abc import Iterable

import numpy as np
import numpy.typing as npt
import torch

from models.item_table import pad_rows, stable_seed

# index, count, last_seen, adaptive-softmax class (-1 = none), has_text, text_hash, n_cats
HEADER = struct.Struct("<qqqqB16sH")
MAX_CATEGORIES = 8


def category_bucket(category: str, buckets: int) -> int:
    """Stable hash of a category name into 1..buckets (0 = padding)."""
    return 1 + stable_seed("cat", category) % buckets


class Catalog:
    def __init__(self, text_dim: int, device: torch.device) -> None:
        self.text_dim = text_dim
        self.device = device
        self.ids: list[str] = [""]  # index -> item id ("" = padding or removed)
        self.index: dict[str, int] = {}
        self.free: list[int] = []
        cap = 1024
        self.text = torch.zeros(cap + 1, max(text_dim, 1), device=device)
        self.cats = np.zeros((cap + 1, MAX_CATEGORIES), dtype=np.int64)
        self.count = np.zeros(cap + 1, dtype=np.int64)
        self.last_seen = np.zeros(cap + 1, dtype=np.int64)
        self.has_text = np.zeros(cap + 1, dtype=bool)
        self.text_hash: dict[int, bytes] = {}
        # Derived, not stored: the id-embedding row of each entry (0 = no own id row).
        self.row_of = np.zeros(cap + 1, dtype=np.int64)
        self.live = np.zeros(cap + 1, dtype=bool)  # index holds an item (not padding / hole)
        # Output class of each entry in the adaptive softmax (-1 = none yet).
        self.asm_class = np.full(cap + 1, -1, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def size(self) -> int:
        """Highest index + 1 (the index space, including padding and holes)."""
        return len(self.ids)

    def _grow(self, need: int) -> None:
        cap = self.text.shape[0]
        if need < cap:
            return
        new = max(need + 1, 2 * cap)
        text = torch.zeros(new, self.text.shape[1], device=self.device)
        text[:cap] = self.text
        self.text = text
        for name in ("cats", "count", "last_seen", "has_text", "row_of", "live"):
            setattr(self, name, pad_rows(getattr(self, name), new - cap))
        self.asm_class = np.concatenate([self.asm_class, np.full(new - cap, -1, np.int64)])

    def ensure(self, item_id: str) -> int:
        """Index of ``item_id``, creating an (empty) entry for an unknown id."""
        idx = self.index.get(item_id)
        if idx is not None:
            return idx
        if self.free:
            idx = heapq.heappop(self.free)  # smallest free index: same choice after a restore
            self.ids[idx] = item_id
        else:
            idx = len(self.ids)
            self._grow(idx)
            self.ids.append(item_id)
        self.index[item_id] = idx
        self.live[idx] = True
        self.count[idx] = 0
        self.last_seen[idx] = 0
        self.has_text[idx] = False
        self.cats[idx] = 0
        self.text[idx] = 0.0
        self.row_of[idx] = 0
        self.asm_class[idx] = -1
        self.text_hash.pop(idx, None)
        return idx

    def set_content(
        self, idx: int, emb: npt.NDArray[np.float32] | None, thash: bytes, buckets: list[int]
    ) -> None:
        self.cats[idx] = 0
        self.cats[idx, : min(len(buckets), MAX_CATEGORIES)] = buckets[:MAX_CATEGORIES]
        if emb is not None and self.text_dim > 0:
            self.text[idx] = torch.from_numpy(emb).to(self.device)
            self.has_text[idx] = True
            self.text_hash[idx] = thash

    def remove(self, item_id: str) -> None:
        idx = self.index.pop(item_id)
        self.ids[idx] = ""
        self.live[idx] = False
        self.text[idx] = 0.0
        self.cats[idx] = 0
        self.count[idx] = 0
        self.has_text[idx] = False
        self.row_of[idx] = 0
        self.asm_class[idx] = -1
        self.text_hash.pop(idx, None)
        heapq.heappush(self.free, idx)

    def live_indices(self) -> npt.NDArray[np.int64]:
        """Indices of live entries, ascending."""
        return np.array(sorted(self.index.values()), dtype=np.int64)

    def pack(self, idx: int) -> bytes:
        return self.pack_many([idx])[0]

    def pack_many(self, idxs: list[int]) -> list[bytes]:
        """Packed entries of ``idxs`` (header + categories + text embedding if any), with
        one gather and device-to-host copy of the text embeddings for all of them."""
        if not idxs:
            return []
        at = np.asarray(idxs, dtype=np.int64)
        text = self.text[torch.from_numpy(at).to(self.device)].detach()
        texts = text.to("cpu", torch.float32).numpy()
        cats = self.cats[at].astype("<i8")
        n_cats = (cats > 0).sum(axis=1).tolist()
        fields = zip(
            idxs,
            self.count[at].tolist(),
            self.last_seen[at].tolist(),
            self.asm_class[at].tolist(),
            self.has_text[at].tolist(),
            n_cats,
            strict=True,
        )
        out = []
        for k, (idx, count, last, cls, has_text, n) in enumerate(fields):
            header = HEADER.pack(
                idx, count, last, cls, int(has_text), self.text_hash.get(idx, b"\0" * 16), n
            )
            out.append(header + cats[k, :n].tobytes() + (texts[k].tobytes() if has_text else b""))
        return out

    def load(self, entries: Iterable[tuple[str, bytes]]) -> None:
        """Rebuild from packed entries (any order): indices come from the entries."""
        parsed = []
        for item_id, blob in entries:
            idx, count, last, asm_class, has_text, thash, n = HEADER.unpack_from(blob)
            off = HEADER.size
            cats = np.frombuffer(blob, dtype="<i8", count=n, offset=off)
            off += 8 * n
            emb = np.frombuffer(blob, dtype=np.float32, offset=off) if has_text else None
            if emb is not None and emb.shape[0] != self.text_dim:
                raise ValueError(
                    f"catalogue entry {item_id!r} has a {emb.shape[0]}-dim text embedding but the "
                    f"encoder gives {self.text_dim}; model.text_encoder changed? restore with the "
                    "original encoder or start a new model key"
                )
            parsed.append((idx, item_id, count, last, asm_class, thash, cats, emb))
        top = max((p[0] for p in parsed), default=0)
        self.__init__(self.text_dim, self.device)  # type: ignore[misc]
        self._grow(top)
        self.ids = [""] * (top + 1)
        for idx, item_id, count, last, asm_class, thash, cats, emb in parsed:
            self.ids[idx] = item_id
            self.index[item_id] = idx
            self.live[idx] = True
            self.count[idx] = count
            self.last_seen[idx] = last
            self.asm_class[idx] = asm_class
            self.set_content(idx, emb, thash, [int(c) for c in cats])
        self.free = [i for i in range(1, top + 1) if not self.ids[i]]  # sorted = a heap
