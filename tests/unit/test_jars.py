"""The operator jar's build bookkeeping (infra.jars), without a JVM."""

from __future__ import annotations

import pytest

from infra import jars


def test_the_operator_sources_ship_with_the_package():
    names = {p.name for p in jars.JAVA_SOURCES.rglob("*.java")}
    assert names == {
        "CheckpointedTimersKeyedProcessOperator.java",
        "CheckpointedTimersKeyedCoProcessOperator.java",
        "FieldAsKey.java",
        "RowField.java",
        "WindowEvents.java",
    }


def test_the_jar_name_follows_the_sources(tmp_path, monkeypatch):
    """A changed source (or Flink version) gets a new cached jar, never a stale one."""
    src = tmp_path / "rtrec" / "flink" / "A.java"
    src.parent.mkdir(parents=True)
    src.write_text("class A {}")
    monkeypatch.setattr(jars, "JAVA_SOURCES", tmp_path)
    first = jars.operators_jar_name()
    assert first == jars.operators_jar_name()
    src.write_text("class A { int x; }")
    assert jars.operators_jar_name() != first


def test_a_prebuilt_jar_in_jars_dir_is_used_as_is(tmp_path):
    prebuilt = tmp_path / jars.operators_jar_name()
    prebuilt.write_bytes(b"PK")
    assert jars.operators_jar(str(tmp_path)) == prebuilt


def test_no_java_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("RTREC_CACHE", str(tmp_path))
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "no-jdk"))
    monkeypatch.setattr(jars.shutil, "which", lambda name: None)
    with pytest.raises(jars.SetupError, match="javac"):
        jars.operators_jar()
