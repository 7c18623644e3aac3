"""Shared fixtures. Tiers are set by directory: tests/unit, tests/flink, tests/e2e."""

from __future__ import annotations

from pathlib import Path

import pytest

from flink_job.config import AppConfig, load_config

TIERS = ("unit", "flink", "e2e")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))


@pytest.fixture
def make_cfg(tmp_path: Path):
    """Build a validated AppConfig from overrides, with the registry in tmp_path."""

    def make(*overrides: str) -> AppConfig:
        return load_config(None, [f"export.registry_dir='{tmp_path / 'registry'}'", *overrides])

    return make


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory):
    """A real single-node Kafka broker (KRaft) on loopback for the whole session."""
    from infra.kafka import EmbeddedKafka

    broker = EmbeddedKafka(tmp_path_factory.mktemp("kafka"))
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny, randomly initialised BERT saved as a local Hugging Face model directory.

    The vocabulary is generated here from the synthetic generator's words, so texts of the
    same topic share tokens; no download is involved.
    """
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    from replay.datasets import TOPICS

    words = sorted({w for topic, ws in TOPICS.items() for w in [topic, *ws]})
    common = ["a", "piece", "about", "and", "the", "of", "#", ".", ","]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *common, *words, *map(str, range(10))]
    d = tmp_path_factory.mktemp("tiny-bert")
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(str(d))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(cfg).save_pretrained(str(d))
    return d
