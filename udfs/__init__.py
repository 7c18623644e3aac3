"""Flink functions: thin adapters between Flink state/records and ``models``.

Each function reads state, calls one function in ``models``, writes state and emits.
"""
