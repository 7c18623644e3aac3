import numpy as np
import pytest
import torch

from flink_job.datasets import TOPICS
from models.catalog import Catalog
from models.config import ModelConfig, TrainerConfig
from models.events import Item
from models.text_encoder import TextEncoder, TextEncoderError, load_encoder, resolve_model_dir
from models.trainer import OnlineLearner, new_meta


def texts(topic: str, n: int = 3) -> list[str]:
    w = TOPICS[topic]
    return [f"A {topic} piece about {w[i]}, {w[i + 1]} and {w[i + 2]}." for i in range(n)]


def test_encoder_is_normalised_batched_and_topical(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir, device=torch.device("cpu"), batch_size=2)
    jazz, space = enc.encode(texts("jazz")), enc.encode(texts("space"))
    assert jazz.shape == (3, 32) and jazz.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(jazz, axis=1), 1.0, atol=1e-5)
    # Batching does not change results.
    np.testing.assert_allclose(enc.encode(texts("jazz")[:1]), jazz[:1], atol=1e-5)
    within = float((jazz @ jazz.T)[np.triu_indices(3, 1)].mean())
    across = float((jazz @ space.T).mean())
    assert within > across


def test_missing_model_names_the_config_key(tmp_path):
    with pytest.raises(TextEncoderError, match=r"model\.text_encoder"):
        resolve_model_dir(str(tmp_path))
    assert load_encoder("none") is None


def test_minilm_default_is_bundled():
    path = resolve_model_dir("minilm")
    assert path is not None and (path / "config.json").is_file()


def test_catalogue_ingest_embeds_once_and_on_change(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir, device=torch.device("cpu"))
    calls = []
    real = enc.encode
    enc.encode = lambda t: (calls.append(list(t)), real(t))[1]
    learner = OnlineLearner(
        ModelConfig(dim=8, history_length=4, hidden=8),
        TrainerConfig(),
        torch.device("cpu"),
        text_dim=enc.dim,
    )
    meta = new_meta("m")
    it = Item("i1", "Swing", "jazz club", ("jazz",), 5)
    learner.ingest_items([it, Item("i2", "Rocket", "space orbit", ("space",), 5)], meta, enc)
    assert len(calls) == 1 and len(calls[0]) == 2
    learner.ingest_items([it], meta, enc)  # unchanged text: not re-embedded
    assert len(calls) == 1
    touched = learner.ingest_items([Item("i1", "Swing", "bebop trumpet", ("jazz",), 6)], meta, enc)
    assert len(calls) == 2 and set(touched) == {"i1"}
    # Packed entries rebuild an identical catalogue.
    cat = Catalog(enc.dim, torch.device("cpu"))
    cat.load((k, learner.catalog.pack(i)) for k, i in learner.catalog.index.items())
    assert torch.equal(cat.text[: cat.size], learner.catalog.text[: cat.size])
    assert cat.index == learner.catalog.index
