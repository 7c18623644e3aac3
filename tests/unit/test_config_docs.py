"""docs/configuration.md is generated from the config dataclasses and kept up to date."""

import dataclasses

import pytest

from rtrec import config_docs

pytestmark = pytest.mark.unit


def test_the_configuration_reference_is_up_to_date():
    current = config_docs.DOC_PATH.read_text() if config_docs.DOC_PATH.is_file() else ""
    assert current == config_docs.render(), (
        f"{config_docs.DOC_PATH} is stale: run `python -m rtrec.config_docs`"
    )


def _keys():
    for section, cls in config_docs.sections():
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", f


def test_every_key_has_a_meaning_and_a_perf_flag():
    undocumented = [key for key, f in _keys() if not str(f.metadata.get("doc", "")).strip()]
    assert undocumented == [], "declare these with models.config.setting(default, doc)"
    assert all(isinstance(f.metadata.get("perf"), bool) for _, f in _keys())


def test_performance_only_keys_come_last_in_each_section():
    for section, cls in config_docs.sections():
        flags = [bool(f.metadata["perf"]) for f in dataclasses.fields(cls)]
        assert flags == sorted(flags), f"[{section}]: performance-only keys go last"


def test_every_key_is_in_its_table():
    text = config_docs.render()
    for key, f in _keys():
        (row,) = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
        assert f.metadata["doc"].replace("|", "\\|") in row
    job = text.split("\n## `[job]`\n")[1].split("\n## `[model]`\n")[0]
    main, perf = job.split("\n### `[job]` performance tuning\n")
    assert "`job.bundle_size`" in perf and "`job.bundle_size`" not in main
    assert "`job.window_ms`" in main and "`job.window_ms`" not in perf
    model = text.split("\n## `[model]`\n")[1].split("\n## `[trainer]`\n")[0]
    assert "performance tuning" not in model


def test_the_header_names_the_profiles_and_the_ways_to_set_values():
    text = config_docs.render()
    for word in ("--config FILE|PROFILE", "--set section.key=value", "rtrec config"):
        assert word in text
    assert "`low-latency`" in text and "`high-throughput`" in text
    assert '"security.protocol" = "SASL_SSL"' in text


def test_check_fails_on_a_stale_file_until_it_is_written(tmp_path, capsys):
    out = tmp_path / "configuration.md"
    assert config_docs.main(["--check", "--out", str(out)]) == 1
    assert "run `python -m rtrec.config_docs`" in capsys.readouterr().err
    out.write_text("old\n")
    assert config_docs.main(["--check", "--out", str(out)]) == 1
    assert config_docs.main(["--out", str(out)]) == 0
    assert out.read_text() == config_docs.render()
    assert config_docs.main(["--check", "--out", str(out)]) == 0
