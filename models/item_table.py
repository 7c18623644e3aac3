"""The sparse side of the model: a dynamic vocabulary of item id rows.

Each known item id owns one row of ``data`` ([capacity + 1, D + K]: its embedding (D) and
its optimizer slots (K, e.g. the row-wise AdaGrad accumulator)), plus a count and a
last-seen event time. Row 0 is the padding / out-of-vocabulary row and stays zero.

In Flink every row lives in MapState under its item id as the bytes of
:meth:`ItemTable.pack_row`; this table is the cache rebuilt from that state. A row keeps
its index in the packed bytes, so a rebuilt table is identical to the one it came from.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from models.state_format import StateFormatError

ROW_HEADER = struct.Struct("<qqq")  # index, count, last_seen_ts


def pad_rows(arr: npt.NDArray[Any], rows: int) -> npt.NDArray[Any]:
    """``arr`` with ``rows`` zero rows appended (growing a capacity-doubling table)."""
    return np.concatenate([arr, np.zeros((rows, *arr.shape[1:]), dtype=arr.dtype)])


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any values, identical across processes and runs (unlike hash())."""
    h = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & 0x7FFF_FFFF_FFFF_FFFF


class ItemTable:
    """Index <-> id mapping plus the row tensor, counts and last-seen times."""

    def __init__(
        self,
        dim: int,
        slots: int,
        max_items: int,
        init_std: float,
        seed: int,
        device: torch.device,
        slot_init: float = 0.0,
    ) -> None:
        self.dim = dim
        self.slots = slots
        self.slot_init = slot_init  # initial value of optimizer slot 0 (AdaGrad's accumulator)
        self.max_items = max_items
        self.init_std = init_std
        self.seed = seed
        self.device = device
        self.ids: list[str] = [""]
        self.index: dict[str, int] = {}
        self.free: list[int] = []  # heap of removed (expired) row indices, reused smallest first
        cap = 1024
        self.data = torch.zeros(cap + 1, dim + slots, device=device)
        self.count = np.zeros(cap + 1, dtype=np.int64)
        self.last_seen = np.zeros(cap + 1, dtype=np.int64)

    def __len__(self) -> int:
        """Number of live id rows (excluding padding and expired holes)."""
        return len(self.index)

    def _grow(self, need: int) -> None:
        cap = self.data.shape[0]
        if need < cap:
            return
        new_cap = max(need + 1, 2 * cap)
        data = torch.zeros(new_cap, self.dim + self.slots, device=self.device)
        data[:cap] = self.data
        self.data = data
        self.count = pad_rows(self.count, new_cap - cap)
        self.last_seen = pad_rows(self.last_seen, new_cap - cap)

    def _init_row(self, item_id: str) -> torch.Tensor:
        # Seeded by the id, not by arrival order: the same id always starts from the same row.
        g = torch.Generator().manual_seed(stable_seed(self.seed, "row", item_id))
        return torch.randn(self.dim, generator=g) * self.init_std

    def lookup(self, item_id: str, add: bool) -> int:
        """Index of ``item_id``; adds a freshly initialised row if ``add`` and capacity allows.

        Returns 0 (the padding row) for unknown ids that are not added.
        """
        idx = self.index.get(item_id)
        if idx is not None:
            return idx
        if not add or len(self) >= self.max_items:
            return 0
        if self.free:
            idx = heapq.heappop(self.free)
            self.ids[idx] = item_id
        else:
            idx = len(self.ids)
            self._grow(idx)
            self.ids.append(item_id)
        self.index[item_id] = idx
        self.data[idx] = 0.0
        if self.slots:
            self.data[idx, self.dim] = self.slot_init
        self.count[idx] = 0
        self.last_seen[idx] = 0
        self.data[idx, : self.dim] = self._init_row(item_id).to(self.device)
        return idx

    def remove(self, item_id: str) -> None:
        """Drop an id row (expiry); its index is reused by the next admitted id."""
        idx = self.index.pop(item_id)
        self.ids[idx] = ""
        self.data[idx] = 0.0
        self.count[idx] = 0
        self.last_seen[idx] = 0
        heapq.heappush(self.free, idx)

    def embeddings(self) -> torch.Tensor:
        """[len + 1, D] id embeddings, row 0 = padding."""
        return self.data[: len(self.ids), : self.dim]

    def pack_rows(self, idxs: list[int]) -> list[bytes]:
        """Packed rows (header + float32 row) of ``idxs``: one gather and one device-to-host
        copy for all of them (a step writes hundreds, and a copy per row costs more than
        its packing)."""
        if not idxs:
            return []
        at = np.asarray(idxs, dtype=np.int64)
        data = self.data[torch.from_numpy(at).to(self.device)].detach()
        rows = data.to("cpu", torch.float32).numpy()
        counts, lasts = self.count[at].tolist(), self.last_seen[at].tolist()
        return [
            ROW_HEADER.pack(i, c, t) + row.tobytes()
            for i, c, t, row in zip(idxs, counts, lasts, rows, strict=True)
        ]

    def load_rows(self, rows: Iterable[tuple[str, bytes]]) -> None:
        """Rebuild from packed rows (any order). Indices come from the rows themselves."""
        loaded: list[tuple[int, str, int, int, npt.NDArray[np.float32]]] = []
        width = self.dim + self.slots
        for item_id, blob in rows:
            idx, count, last = ROW_HEADER.unpack_from(blob)
            vec = np.frombuffer(blob, dtype=np.float32, offset=ROW_HEADER.size)
            if vec.shape[0] != width:
                raise StateFormatError(
                    f"row for item {item_id!r} has width {vec.shape[0]}, the model expects {width} "
                    "(model.dim, model.transition_slots or trainer.optimizer differ from the "
                    "config the state was written with); restore with that config, or start a "
                    "new model key"
                )
            loaded.append((idx, item_id, count, last, vec))
        n = max((r[0] for r in loaded), default=0)
        self.ids = [""] * (n + 1)
        self.index = {}
        self._grow(n)
        self.data.zero_()
        self.count[:] = 0
        self.last_seen[:] = 0
        if loaded:
            idxs = torch.tensor([r[0] for r in loaded], dtype=torch.long)
            vecs = torch.from_numpy(np.stack([r[4] for r in loaded]))
            self.data[idxs.to(self.device)] = vecs.to(self.device)
        for idx, item_id, count, last, _ in loaded:
            self.ids[idx] = item_id
            self.index[item_id] = idx
            self.count[idx] = count
            self.last_seen[idx] = last
        self.free = [i for i in range(1, n + 1) if not self.ids[i]]  # sorted = a heap
