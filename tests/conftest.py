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
    from flink_job.kafka_local import EmbeddedKafka

    broker = EmbeddedKafka(tmp_path_factory.mktemp("kafka"))
    broker.start()
    yield broker
    broker.stop()
