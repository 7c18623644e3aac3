from dataclasses import replace

import numpy as np
import pytest
import torch

from models.catalog import Catalog
from models.config import ModelConfig, TrainerConfig
from models.events import Item
from models.text_encoder import (
    TextEncoder,
    TextEncoderError,
    configured_precision,
    cpu_has_native_bf16,
    embed_items,
    lazy_encoder,
    load_configured_encoder,
    load_encoder,
    resolve_model_dir,
    resolve_precision,
)
from models.trainer import OnlineLearner, new_meta
from replay.datasets import TOPICS


def texts(topic: str, n: int = 3) -> list[str]:
    w = TOPICS[topic]
    return [f"A {topic} piece about {w[i]}, {w[i + 1]} and {w[i + 2]}." for i in range(n)]


def test_encoder_is_normalised_batched_and_topical(tiny_bert_dir):
    enc = TextEncoder(tiny_bert_dir, device=torch.device("cpu"), batch_size=2, precision="float32")
    jazz, space = enc.encode(texts("jazz")), enc.encode(texts("space"))
    assert jazz.shape == (3, 32) and jazz.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(jazz, axis=1), 1.0, atol=1e-5)
    # Batching does not change results.
    np.testing.assert_allclose(enc.encode(texts("jazz")[:1]), jazz[:1], atol=1e-5)
    within = float((jazz @ jazz.T)[np.triu_indices(3, 1)].mean())
    across = float((jazz @ space.T).mean())
    assert within > across


def test_bfloat16_embeds_within_rounding_of_float32(tiny_bert_dir):
    """The bfloat16 path really runs in bfloat16 (other bits) and gives unit vectors
    pointing where float32's do."""
    cpu = torch.device("cpu")
    full = TextEncoder(tiny_bert_dir, device=cpu, precision="float32")
    half = TextEncoder(tiny_bert_dir, device=cpu, precision="bfloat16")
    assert (full.precision, half.precision) == ("float32", "bfloat16")
    text = texts("jazz") + texts("space")
    a, b = full.encode(text), half.encode(text)
    assert b.dtype == np.float32 and not np.array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert float((a * b).sum(axis=1).min()) > 0.999
    # Fine-tuning's differentiable forward stays float32 whatever the setting.
    assert half.forward(text[:1]).dtype == torch.float32


def test_text_precision_resolves_per_device_and_mode():
    cpu = torch.device("cpu")
    native = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert resolve_precision("auto", cpu) == native
    assert resolve_precision("float32", cpu) == "float32"
    assert resolve_precision("bfloat16", cpu) == "bfloat16"
    with pytest.raises(TextEncoderError, match=r"model\.text_precision.*'half'"):
        resolve_precision("half", cpu)
    # Deterministic runs keep float32 unless bfloat16 is asked for by name.
    assert configured_precision(ModelConfig(), deterministic=True) == "float32"
    assert configured_precision(ModelConfig(), deterministic=False) == "auto"
    bf16 = ModelConfig(text_precision="bfloat16")
    assert configured_precision(bf16, deterministic=True) == "bfloat16"


def test_a_runs_encoder_follows_its_config(tiny_bert_dir):
    """What the offline paths load: the configured model, length and precision."""
    cfg = ModelConfig(text_encoder=str(tiny_bert_dir), text_max_length=12)
    enc = load_configured_encoder(cfg, deterministic=True)
    assert enc is not None and (enc.precision, enc.max_length) == ("float32", 12)
    named = load_configured_encoder(replace(cfg, text_precision="bfloat16"), deterministic=True)
    assert named is not None and named.precision == "bfloat16"
    assert load_configured_encoder(ModelConfig(text_encoder="none"), deterministic=False) is None


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


def _learner(text_dim: int) -> OnlineLearner:
    cfg = ModelConfig(dim=8, history_length=4, hidden=8)
    return OnlineLearner(cfg, TrainerConfig(), torch.device("cpu"), text_dim=text_dim)


def test_items_embedded_upstream_give_the_same_catalogue_without_the_transformer(tiny_bert_dir):
    """The job's embedding stage (udfs/embed.py calls embed_items) hands the trainer ready
    vectors: its catalogue is the one the trainer would have built by itself, and its own
    (lazy) encoder never loads."""
    enc = TextEncoder(tiny_bert_dir, device=torch.device("cpu"))
    items = [
        Item("i1", "Swing", "jazz club", ("jazz",), 5),
        Item("i2", "Rocket launch over the orbit", "", ("space",), 5),
        Item("i3", "", "", (), 5),  # no text: nothing to embed
    ]
    embedded = embed_items(items, enc)
    # The stage's own encoder is lazy too: a batch with no text does not load it, the
    # first with text does, and gives the vectors of an encoder loaded up front (on its
    # own device: CUDA where present, hence close rather than equal).
    stage = lazy_encoder(str(tiny_bert_dir))
    assert stage is not None
    assert embed_items(items[2:], stage) == items[2:] and stage.loaded is None
    for a, b in zip(embed_items(items, stage), embedded, strict=True):
        va, vb = (np.frombuffer(x.text_vector, np.float32) for x in (a, b))
        assert a.item_id == b.item_id and va.shape == vb.shape
        np.testing.assert_allclose(va, vb, atol=1e-5)
    assert stage.loaded is not None
    assert [len(it.text_vector) for it in embedded] == [4 * enc.dim, 4 * enc.dim, 0]
    assert [(it.item_id, it.full_text) for it in embedded] == [
        (it.item_id, it.full_text) for it in items
    ]
    np.testing.assert_array_equal(
        np.frombuffer(embedded[1].text_vector, np.float32), enc.encode([items[1].full_text])[0]
    )

    by_itself, upstream = _learner(enc.dim), _learner(enc.dim)
    by_itself.ingest_items(items, new_meta("m"), enc)
    lazy = lazy_encoder(str(tiny_bert_dir))
    assert lazy is not None and lazy.dim == enc.dim
    touched = upstream.ingest_items(embedded, new_meta("m"), lazy)
    assert lazy.loaded is None  # every vector came with its item
    assert touched == {i: by_itself.catalog.pack(by_itself.catalog.index[i]) for i in touched}
    assert upstream.catalog.has_text[upstream.catalog.index["i1"]]

    # A record without a vector (e.g. from state written before the stage) loads it.
    upstream.ingest_items([Item("i4", "Bebop", "trumpet", ("jazz",), 6)], new_meta("m"), lazy)
    assert lazy.loaded is not None
    assert upstream.catalog.has_text[upstream.catalog.index["i4"]]


def test_a_text_vector_of_the_wrong_width_is_a_clear_error(tiny_bert_dir):
    item = Item("i1", "Swing", "", (), 5, np.zeros(7, np.float32).tobytes())
    with pytest.raises(ValueError, match=r"'i1'.*7 values.*model\.text_encoder"):
        _learner(32).ingest_items([item], new_meta("m"), None)
