"""Every use of PyFlink's private API in rtrec, behind small named functions.

PyFlink 2.2's public Python API has no way to reach the Java objects behind a stream, to
plug in Java operators of rtrec's own, or to set a few connector options; rtrec does
these through PyFlink internals (names starting with ``_``, the py4j gateway's JVM view,
``pyflink.fn_execution``). They live here and nowhere else in the job, so an upgrade of
PyFlink has one module to check. docs/pyflink-notes.md says why each is needed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from pyflink.common.typeinfo import TypeInformation, _from_java_type
from pyflink.datastream import data_stream as _ds
from pyflink.fn_execution.flink_fn_execution_pb2 import UserDefinedDataStreamFunction
from pyflink.java_gateway import get_gateway

# Set on PyFlink's data_stream module once the operator hook is installed (per process).
_HOOKED = "_rtrec_operator_hook"
# PyFlink's own (lower-case) environment variable for where a local run's Python workers
# run; read when the job is submitted. Unset: loopback workers, threads of this process.
_WORKER_MODE_VAR = "_python_worker_execution_mode"


def jvm() -> Any:
    """The py4j view of the JVM PyFlink talks to (started on first use)."""
    return get_gateway().jvm


def jvm_started() -> bool:
    """Whether PyFlink has already started (or connected to) its JVM in this process."""
    import pyflink.java_gateway as gateway

    return gateway._gateway is not None


def start_jvm() -> None:
    """Start PyFlink's JVM now (it reads extra JVM options from ``JVM_ARGS`` as it starts)."""
    get_gateway()


def set_local_python_workers(processes: bool) -> None:
    """Where a local mini-cluster's Python workers run: worker processes (``True``) or
    PyFlink's default loopback workers, threads of this process sharing its GIL."""
    if processes:
        os.environ[_WORKER_MODE_VAR] = "process"
    else:
        os.environ.pop(_WORKER_MODE_VAR, None)


def java_stream(stream: Any) -> Any:
    """The Java ``DataStream`` behind a PyFlink ``DataStream`` (or keyed stream)."""
    return stream._j_data_stream


def transformation(stream: Any) -> Any:
    """The Java ``Transformation`` that produces ``stream``."""
    return java_stream(stream).getTransformation()


def output_type(stream: Any) -> TypeInformation:
    """The PyFlink type of ``stream``'s records, read back from its Java transformation."""
    return _from_java_type(transformation(stream).getOutputType())


def data_stream(j_stream: Any) -> Any:
    """A PyFlink ``DataStream`` over a Java ``DataStream``."""
    return _ds.DataStream(j_stream)


def keyed_stream(j_keyed: Any, record_type: TypeInformation, origin: Any) -> Any:
    """A PyFlink ``KeyedStream`` over a Java keyed stream of ``Row(key, record)`` rows, as
    PyFlink's own ``key_by`` makes it; ``origin`` is the PyFlink stream it was keyed from."""
    return _ds.KeyedStream(j_keyed, record_type, origin)


def row_key_selector() -> Any:
    """PyFlink's Java key selector for ``Row(key, record)`` rows (the key is field 0)."""
    return jvm().KeyByKeySelector()


def set_parallelism_between(upstream: Any, downstream: Any, parallelism: int) -> None:
    """Give every transformation after ``upstream`` up to and including ``downstream`` (a
    chain of single-input transformations) ``parallelism``, operators PyFlink added on
    its own included."""
    stop = transformation(upstream).getId()
    t = transformation(downstream)
    while t.getId() != stop:
        t.setParallelism(parallelism)
        (t,) = t.getInputs()


def use_fixed_partitioner(records_builder: Any) -> None:
    """Make a ``KafkaRecordSerializationSchema`` builder's sink write each subtask's
    records to one partition (``FlinkFixedPartitioner``; PyFlink's builder has no setter)."""
    partitioner = jvm().org.apache.flink.streaming.connectors.kafka.partitioner
    records_builder._j_builder.setPartitioner(partitioner.FlinkFixedPartitioner())


def is_keyed_process(func_type: int) -> bool:
    """Whether a Python function type (PyFlink's protobuf enum) is a keyed process or keyed
    co-process function."""
    return func_type in (
        UserDefinedDataStreamFunction.KEYED_PROCESS,
        UserDefinedDataStreamFunction.KEYED_CO_PROCESS,
    )


OperatorHook = Callable[..., Any]


def hook_python_operators(hook: OperatorHook) -> None:
    """Pass every Python operator PyFlink builds from now on (in this process) through
    ``hook(j_op, func_type, *j_input_types)``, which returns the Java operator to use.

    ``j_op`` is the Java operator PyFlink made, ``func_type`` the function type (see
    :func:`is_keyed_process`) and ``j_input_types`` the Java types of its one or two
    inputs. Installed once per process: later calls do nothing.
    """
    if getattr(_ds, _HOOKED, False):
        return
    one_input, two_input = _ds._get_one_input_stream_operator, _ds._get_two_input_stream_operator

    def one(data_stream, func, func_type, output_type=None):
        j_op, j_out = one_input(data_stream, func, func_type, output_type)
        return hook(j_op, func_type, j_op.getInputTypeInfo()), j_out

    def two(connected_streams, func, func_type, type_info):
        j_op, j_out = two_input(connected_streams, func, func_type, type_info)
        inputs = (
            transformation(s).getOutputType()
            for s in (connected_streams.stream1, connected_streams.stream2)
        )
        return hook(j_op, func_type, *inputs), j_out

    _ds._get_one_input_stream_operator = one
    _ds._get_two_input_stream_operator = two
    setattr(_ds, _HOOKED, True)
