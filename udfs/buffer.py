"""A keyed ListState used as a buffer, with its length mirrored in Python."""

from __future__ import annotations


class KeyedBuffer:
    """Append / drain a keyed ListState, knowing its length without reading it.

    The length is mirrored per key: one state call per element instead of a read of the
    whole list. Valid because every change of the list goes through this object; a restart
    or rescale opens a new instance, which counts the list once on a key's first use.
    """

    def __init__(self, state) -> None:
        self.state = state
        self._len: dict[str, int] = {}

    def size(self, key: str) -> int:
        """Rows buffered for ``key`` (the current key)."""
        n = self._len.get(key)
        if n is None:  # first use of this key since the instance opened
            n = self._len[key] = sum(1 for _ in self.state.get())
        return n

    def add(self, key: str, row) -> int:
        """Append ``row`` for the current ``key``; the new length."""
        n = self.size(key) + 1
        self.state.add(row)
        self._len[key] = n
        return n

    def drain(self, key: str) -> list:
        """Every buffered row of the current ``key``, oldest first; the buffer is emptied."""
        rows = list(self.state.get()) if self.size(key) else []
        if rows:
            self.state.clear()
        self._len[key] = 0
        return rows
