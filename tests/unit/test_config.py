import dataclasses
import subprocess
import sys
import tomllib

import pytest

from flink_job.config import (
    PROFILES_DIR,
    AppConfig,
    ConfigError,
    JobConfig,
    load_config,
    profile_names,
    to_toml,
)

pytestmark = pytest.mark.unit


def test_defaults_are_valid():
    cfg = load_config()
    assert isinstance(cfg, AppConfig)
    assert cfg.trainer.optimizer == "adagrad"
    assert cfg.kafka.events_topic == "events"


def test_toml_file_and_cli_override(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text(
        '[trainer]\nlr = 0.2\nbatch_size = 8\n[kafka.properties]\n"security.protocol" = "SSL"\n'
    )
    cfg = load_config(f, ["trainer.lr=0.5", "kafka.properties.sasl.mechanism=PLAIN"])
    assert cfg.trainer.lr == 0.5  # CLI wins over file
    assert cfg.trainer.batch_size == 8
    assert cfg.kafka.properties == {"security.protocol": "SSL", "sasl.mechanism": "PLAIN"}


def test_int_accepted_for_float():
    assert load_config(None, ["trainer.lr=1"]).trainer.lr == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.lr_typo=0.1", "unknown key(s) trainer.lr_typo"),
        ("nosuch.key=1", "unknown key(s) nosuch"),
        ("trainer.batch_size='big'", "trainer.batch_size: expected int"),
        ("trainer.batch_size=true", "expected int, got boolean"),
        ("trainer.optimizer='rmsprop'", "trainer.optimizer must be one of"),
        ("trainer.batch_size=0", "trainer.batch_size must be > 0"),
        ("trainer.catchup_factor=0", "trainer.catchup_factor must be > 0"),
        ("job.local_python_workers='threads'", "job.local_python_workers must be"),
        ("model.text_precision='half'", "model.text_precision must be one of auto, float32"),
        ("noequals", "must look like section.key=value"),
    ],
)
def test_bad_config_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_flink_options_pass_through_after_the_derived_ones():
    from flink_job.job import flink_settings

    cfg = load_config(
        None,
        [
            'job.flink={"python.fn-execution.arrow.batch.size"="77", '
            '"python.state.cache-size"="9"}',
            "job.state_cache_size=5",
            "job.bundle_size=321",
        ],
    )
    got = flink_settings(cfg, "file:///x.jar")
    assert got["python.fn-execution.arrow.batch.size"] == "77"
    assert got["python.state.cache-size"] == "9"  # job.flink wins over the derived option
    assert got["python.map-state.read-cache-size"] == "5"
    assert got["python.fn-execution.bundle.size"] == "321"
    assert got["pipeline.jars"] == "file:///x.jar"


def test_history_source_and_transition_decay_are_checked():
    assert load_config(None, ["model.history_source='positives'"]).model.history_source == (
        "positives"
    )
    with pytest.raises(ConfigError, match=r"model.history_source must be one of events"):
        load_config(None, ["model.history_source='clicks'"])
    with pytest.raises(ConfigError, match=r"model.transition_decay must be in \(0, 1\]"):
        load_config(None, ["model.transition_decay=0"])


def test_bounded_restore_is_refused_with_the_way_out():
    with pytest.raises(ConfigError, match=r"kafka.bounded=true cannot restore.*rtrec stop"):
        load_config(None, ["kafka.bounded=true", "job.from_savepoint='/tmp/sp'"])
    assert load_config(None, ["job.from_savepoint='/tmp/sp'"]).job.from_savepoint == "/tmp/sp"


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[trainer\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_a_removed_key_is_an_error_naming_the_valid_keys(tmp_path):
    """A file that sets job.python_mode (no longer a key: Python always runs in worker
    processes) fails like any unknown key, naming the keys [job] takes."""
    f = tmp_path / "old.toml"
    f.write_text('[job]\npython_mode = "process"\n')
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert msg.startswith("unknown key(s) job.python_mode; valid keys in [job]: ")
    valid = msg.split(": ", 1)[1].split(", ")
    assert valid == sorted(k.name for k in dataclasses.fields(JobConfig))
    assert "python_mode" not in valid and "bundle_size" in valid


def test_profiles_load_by_name():
    assert profile_names() == sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))
    assert {"low-latency", "high-throughput"} <= set(profile_names())
    for name in profile_names():
        from_file = load_config(PROFILES_DIR / f"{name}.toml")
        assert load_config(name) == from_file
        assert load_config(f"{name}.toml", []) == from_file
        assert from_file != load_config()
    assert load_config("low-latency", ["job.window_ms=7"]).job.window_ms == 7


def test_an_existing_file_wins_over_a_profile_of_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "low-latency").write_text("[trainer]\nlr = 0.25\n")
    cfg = load_config("low-latency")
    assert cfg.trainer.lr == 0.25
    assert cfg.job.window_ms == JobConfig.window_ms  # not the profile's


def test_an_unknown_profile_names_the_profiles(tmp_path):
    with pytest.raises(ConfigError, match="is neither a file nor a profile") as err:
        load_config("low-latncy")
    assert ", ".join(profile_names()) in str(err.value)
    # A path is never looked up among the profiles.
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "low-latency")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/low-latency.toml")


def test_to_toml_round_trips():
    cfg = load_config(None, ["kafka.properties.security.protocol=SSL", "trainer.lr=0.3"])
    again = load_config(None, [])
    data = tomllib.loads(to_toml(cfg))
    assert data["trainer"]["lr"] == 0.3
    assert data["kafka"]["properties"] == {"security.protocol": "SSL"}
    assert to_toml(again) != to_toml(cfg)


def test_rtrec_config_command_prints_resolved_toml():
    out = subprocess.run(
        [sys.executable, "-m", "rtrec.cli", "config", "--set", "trainer.lr=0.125"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert tomllib.loads(out)["trainer"]["lr"] == 0.125


def test_rtrec_config_command_rejects_unknown_key():
    proc = subprocess.run(
        [sys.executable, "-m", "rtrec.cli", "config", "--set", "trainer.nope=1"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "unknown key(s) trainer.nope" in proc.stderr


def test_trainer_slot_group_sizes_the_local_mini_cluster():
    """A separate slot-sharing group for the trainer (at parallelism 1) needs parallelism +
    1 slots; without one the mini-cluster keeps Flink's own sizing (one slot per parallel
    subtask)."""
    from flink_job.job import flink_settings

    got = flink_settings(load_config(None, ["job.parallelism=3"]), "file:///x.jar")
    assert got["taskmanager.numberOfTaskSlots"] == "4"
    shared = load_config(None, ["job.parallelism=3", "job.trainer_slot_group=''"])
    assert "taskmanager.numberOfTaskSlots" not in flink_settings(shared, "file:///x.jar")
    mine = load_config(None, ['job.flink={"taskmanager.numberOfTaskSlots"="8"}'])
    assert flink_settings(mine, "file:///x.jar")["taskmanager.numberOfTaskSlots"] == "8"


def test_an_embedding_slot_group_adds_slots_only_with_a_text_encoder():
    from flink_job.job import flink_settings

    def slots(*ov: str) -> str | None:
        cfg = load_config(None, ["job.parallelism=2", *ov])
        return flink_settings(cfg, "file:///x.jar").get("taskmanager.numberOfTaskSlots")

    assert slots() == "3"  # default: embedding shares the parsing stages' slots
    assert slots("job.embed_slot_group='embed'") == "5"
    assert slots("job.embed_slot_group='embed'", "model.text_encoder='none'") == "3"
    assert slots("job.embed_slot_group='embed'", "job.trainer_slot_group=''") == "4"


def test_kafka_properties_reach_each_python_client_as_it_takes_them():
    """kafka.properties also configure the job's Flink clients: a property a kafka-python
    client does not take is left out (not an error), text numbers become numbers, and the
    caller's own settings win."""
    from kafka import KafkaAdminClient, KafkaConsumer

    from infra.kafka import client_properties

    props = {
        "security.protocol": "PLAINTEXT",
        "max.partition.fetch.bytes": "65536",
        "check.crcs": "false",
        "transaction.timeout.ms": "900000",  # a producer setting of the job's Kafka sink
    }
    admin = client_properties("h:1", props, KafkaAdminClient)
    assert admin == {"bootstrap_servers": "h:1", "security_protocol": "PLAINTEXT"}
    consumer = client_properties("h:1", props, KafkaConsumer, enable_auto_commit=False)
    assert consumer["max_partition_fetch_bytes"] == 65536
    assert consumer["check_crcs"] is False and consumer["enable_auto_commit"] is False
    assert "transaction_timeout_ms" not in consumer
    assert (
        client_properties("h:1", props, KafkaConsumer, max_partition_fetch_bytes=9)[
            "max_partition_fetch_bytes"
        ]
        == 9
    )


def test_jvm_options_reach_the_standalone_cluster_rtrec_starts(tmp_path):
    """job.jvm_options becomes env.java.opts.all of the cluster's JVMs; '' keeps Flink's."""
    from flink_job.config import JobConfig
    from infra.cluster import StandaloneCluster

    assert load_config(None, []).job.jvm_options == JobConfig.jvm_options
    assert "-XX:TieredStopAtLevel=1" in JobConfig.jvm_options.split()
    conf = StandaloneCluster(tmp_path)._conf()
    assert conf["env.java.opts.all"] == JobConfig.jvm_options
    assert "env.java.opts.all" not in StandaloneCluster(tmp_path, jvm_options="")._conf()
