"""Pure PyTorch / transformers / ONNX code for rtrec.

Nothing in this package imports pyflink: the Flink functions in ``udfs`` are thin
adapters that read state, call one function here, and write state back. That keeps
the learning code testable without a JVM and reusable by offline evaluation.
"""
