"""Row layouts between operators (no JVM: only the tuple conversions)."""

import numpy as np

from models.events import Item
from udfs.buffer import KeyedBuffer
from udfs.embed import BUCKETS, bucket_key
from udfs.records import item_to_row, row_to_item


def test_item_rows_carry_the_text_vector():
    vec = np.arange(4, dtype=np.float32).tobytes()
    it = Item("i1", "Swing", "jazz club", ("jazz", "live"), 5, vec)
    row = item_to_row("m", it)
    assert len(row) == 7 and row[0] == "m" and row_to_item(row) == it
    # A null vector field reads as not embedded yet.
    assert row_to_item((*row[:6], None)) == Item("i1", "Swing", "jazz club", ("jazz", "live"), 5)


def test_embedding_buckets_keep_an_item_in_one_bucket_of_its_model():
    rows = [item_to_row(m, Item(f"i{n}", "t", "", (), 0)) for m in ("a", "b") for n in range(400)]
    keys = {bucket_key(r) for r in rows}
    assert len(keys) == 2 * BUCKETS  # ids spread over every bucket of each model key
    assert all(k.split("\x1f")[0] in ("a", "b") for k in keys)
    again = item_to_row("a", Item("i7", "other title", "x", (), 9))
    assert bucket_key(again) == bucket_key(rows[7])  # updates of one item stay in order


class ListStateOfKey:
    """A keyed ListState as a Python function sees it: the current key's list."""

    def __init__(self) -> None:
        self.lists: dict[str, list] = {}
        self.key = ""
        self.reads = 0

    def get(self):
        self.reads += 1
        return iter(list(self.lists.get(self.key, [])))

    def add(self, row) -> None:
        self.lists.setdefault(self.key, []).append(row)

    def clear(self) -> None:
        self.lists.pop(self.key, None)


def test_keyed_buffer_mirrors_lengths_and_drains_in_order():
    state = ListStateOfKey()
    state.lists["b"] = ["restored"]  # from a checkpoint: counted once on first use
    buf = KeyedBuffer(state)
    state.key = "a"
    assert [buf.add("a", r) for r in ("x", "y")] == [1, 2]
    state.key = "b"
    assert buf.add("b", "z") == 2
    reads = state.reads
    assert buf.size("b") == 2 and state.reads == reads  # no state read for the length
    assert buf.drain("b") == ["restored", "z"] and buf.size("b") == 0
    assert buf.drain("b") == [] and state.reads == reads + 1  # empty: not read again
    state.key = "a"
    assert buf.drain("a") == ["x", "y"] and state.lists == {}
