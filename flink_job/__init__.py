"""Flink job wiring, configuration, CLI and local infrastructure for rtrec."""
