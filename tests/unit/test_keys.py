"""The pseudonymisation key (flink_job/keys.py): no usable default, where it comes from,
and that it never shows in configuration output, manifests, metrics, models or logs."""

import json
import logging
import stat

import pytest

from flink_job import keys
from flink_job.config import ConfigError, load_config

SECRET = "s3cret-key-for-tests-7f2a9c41d0e8"


@pytest.fixture
def local_key(tmp_path, monkeypatch):
    path = tmp_path / ".rtrec" / "hmac.key"
    monkeypatch.setattr(keys, "LOCAL_KEY_FILE", path)
    monkeypatch.delenv(keys.KEY_ENV, raising=False)
    return path


def test_an_inline_key_is_refused_with_what_to_do_instead():
    with pytest.raises(ConfigError, match=r"job\.hmac_key is not read") as e:
        load_config(None, ["job.hmac_key='rtrec-change-me'"])
    assert "job.hmac_key_file" in str(e.value) and keys.KEY_ENV in str(e.value)


def test_local_runs_generate_a_private_key_once_and_say_so_once(local_key, capsys):
    cfg = load_config(None, [])
    first = keys.pseudonymisation_key(cfg)
    assert len(first) == 64 and local_key.read_text().strip() == first
    assert stat.S_IMODE(local_key.stat().st_mode) == 0o600
    assert "generated a pseudonymisation key" in capsys.readouterr().err
    assert keys.pseudonymisation_key(cfg) == first
    assert capsys.readouterr().err == ""


def test_a_deployment_needs_a_key_from_a_file_or_the_environment(local_key, tmp_path, monkeypatch):
    cfg = load_config(None, [])
    with pytest.raises(ConfigError, match="no pseudonymisation key") as e:
        keys.require_deployment_key(cfg)
    assert "openssl rand -hex 32" in str(e.value)
    assert not local_key.exists(), "a deployment check must not generate a local key"
    monkeypatch.setenv(keys.KEY_ENV, SECRET)
    keys.require_deployment_key(cfg)
    assert keys.pseudonymisation_key(cfg) == SECRET
    monkeypatch.delenv(keys.KEY_ENV)
    f = tmp_path / "key"
    f.write_text(SECRET + "\n")
    f.chmod(0o600)
    with_file = load_config(None, [f"job.hmac_key_file='{f}'"])
    keys.require_deployment_key(with_file)
    assert keys.pseudonymisation_key(with_file) == SECRET
    keys.require_deployment_key(load_config(None, ["job.pseudonymise=false"]))


@pytest.mark.parametrize("problem", ["missing", "short", "world-readable"])
def test_a_bad_key_file_is_named(tmp_path, caplog, problem):
    f = tmp_path / "key"
    if problem != "missing":
        f.write_text("short" if problem == "short" else SECRET)
        f.chmod(0o644)
    cfg = load_config(None, [f"job.hmac_key_file='{f}'"])
    if problem == "world-readable":
        with caplog.at_level(logging.WARNING):
            assert keys.pseudonymisation_key(cfg) == SECRET
        assert "chmod 600" in caplog.text
        return
    with pytest.raises(ConfigError, match=r"job\.hmac_key_file") as e:
        keys.pseudonymisation_key(cfg)
    assert ("cannot be read" if problem == "missing" else "at least 16") in str(e.value)


def test_submit_refuses_to_start_without_a_deployment_key(local_key, capsys):
    from rtrec.cli import main

    assert main(["submit", "--bootstrap", "broker:9092"]) == 2
    assert "no pseudonymisation key" in capsys.readouterr().err


def test_the_key_is_in_no_output(monkeypatch, caplog, capsys):
    """Through the job's trainer code (offline.stream): manifests, metrics records, model
    files, `rtrec config` and the logs never hold the key; user ids are pseudonymised."""
    from offline.stream import job_firings, trainer_without_flink
    from replay.datasets import synthetic
    from rtrec.cli import main

    monkeypatch.setenv(keys.KEY_ENV, SECRET)
    cfg = load_config(
        None,
        [
            "trainer.deterministic=true",
            "model.text_encoder='none'",
            "trainer.export_every_steps=5",
            "replay.num_events=800",
            "replay.num_items=60",
        ],
    )
    records = list(synthetic(cfg.replay))
    with caplog.at_level(logging.DEBUG):
        run = trainer_without_flink(records, cfg)
        assert main(["config"]) == 0
    assert run.versions
    secret = SECRET.encode()
    for v in run.versions:
        assert secret not in json.dumps(v.manifest).encode()
        assert secret not in v.onnx_bytes
        assert all(secret not in data for data in v.extras.values())
    assert all(SECRET not in json.dumps(m) for m in run.metrics)
    assert SECRET not in capsys.readouterr().out
    assert SECRET not in caplog.text
    users = {s.user_id for _, samples, _ in job_firings(records, cfg) for s in samples}
    assert users and not any(u.startswith("user") for u in users)
