"""The on-disk cache of catalogue text vectors that offline runs share (EmbeddingCache)."""

import shutil

import numpy as np
import torch

from models.text_encoder import TextEncoder, load_encoder
from replay.datasets import TOPICS


def catalogue(n: int = 7) -> list[str]:
    words = TOPICS["jazz"]
    return [f"A jazz piece about {words[i % len(words)]} #{i}." for i in range(n)]


def encoder(model_dir, cache_dir, max_length: int = 64) -> TextEncoder:
    enc = load_encoder(str(model_dir), max_length, precision="float32", cache_dir=cache_dir)
    assert enc is not None
    return enc


def test_a_second_run_reads_the_cache_and_gets_the_same_vectors(
    tiny_bert_dir, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    first = encoder(tiny_bert_dir, cache).encode(catalogue())
    assert len(list(cache.glob("*.npy"))) == 1

    def no_transformer(self, texts):
        raise AssertionError("the second run ran the transformer")

    # A fresh encoder (a new process, as far as the cache knows) never runs the model.
    with monkeypatch.context() as m:
        m.setattr(TextEncoder, "_encode", no_transformer)
        second = encoder(tiny_bert_dir, cache).encode(catalogue())
    np.testing.assert_array_equal(second, first)
    # The same catalogue in another order (e.g. other ids) is the same cache entry.
    with monkeypatch.context() as m:
        m.setattr(TextEncoder, "_encode", no_transformer)
        backwards = encoder(tiny_bert_dir, cache).encode(catalogue()[::-1])
    np.testing.assert_array_equal(backwards, first[::-1])
    uncached = TextEncoder(tiny_bert_dir, device=torch.device("cpu"), precision="float32")
    np.testing.assert_allclose(uncached.encode(catalogue()), first, atol=1e-6)


def test_the_key_covers_the_texts_max_length_and_model(tiny_bert_dir, tmp_path):
    cache = tmp_path / "cache"
    encoder(tiny_bert_dir, cache).encode(catalogue())
    encoder(tiny_bert_dir, cache).encode(catalogue(8))  # other texts
    encoder(tiny_bert_dir, cache, max_length=8).encode(catalogue())  # other truncation
    # A copy of the model directory is the same model; a changed file is another one.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert_dir, copy)
    encoder(copy, cache).encode(catalogue())
    assert len(list(cache.glob("*.npy"))) == 3
    (copy / "vocab.txt").write_text((copy / "vocab.txt").read_text() + "extra\n")
    encoder(copy, cache).encode(catalogue())
    assert len(list(cache.glob("*.npy"))) == 4


def test_a_damaged_file_is_recomputed(tiny_bert_dir, tmp_path):
    cache = tmp_path / "cache"
    first = encoder(tiny_bert_dir, cache).encode(catalogue())
    (path,) = cache.glob("*.npy")
    path.write_bytes(b"not an array")
    np.testing.assert_array_equal(encoder(tiny_bert_dir, cache).encode(catalogue()), first)
    assert np.load(path).shape == first.shape
