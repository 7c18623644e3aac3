"""rtrec's Java operators (flink_job/java) in place of PyFlink's keyed Python operators.

PyFlink 2.2 (process mode) registers the timers a Python function sets asynchronously, as
mailbox mails that run after the checkpoint which flushed their bundle. That checkpoint then
holds keyed state (e.g. a user's pending window events) without the timer that would fire
it: after a restore the state waits forever and the events are lost. The subclasses in
flink_job/java drain those registrations into the checkpoint (and the keyed process one
ends a bundle of timers by the bundle time, which PyFlink's does only for elements); this
module makes PyFlink's graph builder instantiate them for every keyed process / keyed
co-process function.

:func:`key_by_field` keys a stream of tuples in the JVM (``FieldAsKey``) instead of with
PyFlink's Python key map.

The operator jar (infra.jars.operators_jar) must be in ``pipeline.jars`` of the job;
flink_job.job.make_env adds it and calls :func:`use_checkpointed_timers`.
"""

from __future__ import annotations

from pyflink.common import Types
from pyflink.common.typeinfo import _from_java_type
from pyflink.datastream import data_stream as _ds
from pyflink.fn_execution.flink_fn_execution_pb2 import UserDefinedDataStreamFunction
from pyflink.java_gateway import get_gateway

PACKAGE = "rtrec.flink"
_PYFLINK = "org.apache.flink.streaming.api.operators.python.process."
# PyFlink's process-mode operator -> rtrec's subclass (thread mode is not used by rtrec).
REPLACES = {
    _PYFLINK + "ExternalPythonKeyedProcessOperator": "CheckpointedTimersKeyedProcessOperator",
    _PYFLINK + "ExternalPythonKeyedCoProcessOperator": "CheckpointedTimersKeyedCoProcessOperator",
}
_KEYED = (
    UserDefinedDataStreamFunction.KEYED_PROCESS,
    UserDefinedDataStreamFunction.KEYED_CO_PROCESS,
)


def _ours(j_op, func_type, *inputs):
    """rtrec's operator with ``j_op``'s function and types, or ``j_op`` if not replaced
    (stateless functions; windows, whose operator has a window namespace)."""
    name = REPLACES.get(j_op.getClass().getName())
    if name is None or func_type not in _KEYED:
        return j_op
    cls = getattr(getattr(get_gateway().jvm, PACKAGE), name)
    return cls(
        j_op.getConfiguration(), j_op.getPythonFunctionInfo(), *inputs, j_op.getProducedType()
    )


def use_checkpointed_timers() -> None:
    """Make PyFlink build keyed (co-)process operators from rtrec's subclasses (idempotent,
    for this Python process)."""
    if getattr(_ds, "_rtrec_checkpointed_timers", False):
        return
    one_input, two_input = _ds._get_one_input_stream_operator, _ds._get_two_input_stream_operator

    def one(data_stream, func, func_type, output_type=None):
        j_op, j_out = one_input(data_stream, func, func_type, output_type)
        return _ours(j_op, func_type, j_op.getInputTypeInfo()), j_out

    def two(connected_streams, func, func_type, type_info):
        j_op, j_out = two_input(connected_streams, func, func_type, type_info)
        inputs = (
            s._j_data_stream.getTransformation().getOutputType()
            for s in (connected_streams.stream1, connected_streams.stream2)
        )
        return _ours(j_op, func_type, *inputs), j_out

    _ds._get_one_input_stream_operator = one
    _ds._get_two_input_stream_operator = two
    _ds._rtrec_checkpointed_timers = True


def key_by_field(stream, field: int, key_type=None):
    """``stream.key_by(lambda r: r[field], key_type)`` for a stream of tuple records, with the
    (key, record) rows made in the JVM (``rtrec.flink.FieldAsKey``) instead of by a Python map.

    Same partitioning and the same input layout for the keyed Python function downstream;
    one Python pass per record less, and no Python map whose bundle holds the records it has
    keyed while the operator before it fires timers (see FieldAsKey.java).
    """
    j_keyed, record_type = _keyed_in_jvm(stream, field, key_type or Types.STRING())
    return _ds.KeyedStream(j_keyed, record_type, stream)


def _keyed_in_jvm(stream, field: int, key_type):
    """The Java keyed stream of ``Row(record[field], record)`` rows, and the records' type."""
    jvm = get_gateway().jvm
    j_stream = stream._j_data_stream
    record_type = _from_java_type(j_stream.getTransformation().getOutputType())
    keyed_rows = j_stream.map(
        getattr(jvm, PACKAGE).FieldAsKey(field),
        Types.ROW([key_type, record_type]).get_java_type_info(),
    ).name(f"key-by-field-{field}")
    j_keyed = keyed_rows.keyBy(jvm.KeyByKeySelector(), Types.ROW([key_type]).get_java_type_info())
    return j_keyed, record_type


def windows_by_field(stream, field: int, window_ms: int, name: str):
    """A stream of tuple records -> (keyed stream of ``(key, [record, ...])``, late records):
    tumbling event-time windows of ``window_ms`` per ``record[field]`` (a string key), kept by
    Flink's own window operator in the JVM (``rtrec.flink.WindowEvents``).

    Each closed window reaches the keyed Python function downstream as one element, its
    records in arrival order, with the window's last millisecond as its timestamp, keyed as
    :func:`key_by_field` keys (the window operator's output is already partitioned so, and
    is passed on without a shuffle). A record whose window the watermark has passed (its
    last millisecond <= the watermark) goes to the second stream, the window operator's
    late side output. ``name``: the window operator's uid and name.
    """
    jvm = get_gateway().jvm
    flink = jvm.org.apache.flink
    j_keyed_rows, record_type = _keyed_in_jvm(stream, field, Types.STRING())
    late_tag = flink.util.OutputTag(
        f"{name}-late", Types.ROW([Types.STRING(), record_type]).get_java_type_info()
    )
    window_type = Types.TUPLE([Types.STRING(), Types.LIST(record_type)])
    assigner = flink.streaming.api.windowing.assigners.TumblingEventTimeWindows.of(
        jvm.java.time.Duration.ofMillis(window_ms)
    )
    j_windows = (
        j_keyed_rows.window(assigner)
        .sideOutputLateData(late_tag)
        .process(
            getattr(jvm, PACKAGE).WindowEvents(),
            Types.ROW([Types.STRING(), window_type]).get_java_type_info(),
        )
        .uid(name)
        .name(name)
    )
    j_late = j_windows.getSideOutput(late_tag).map(
        getattr(jvm, PACKAGE).RowField(1), record_type.get_java_type_info()
    )
    j_keyed = flink.streaming.api.datastream.DataStreamUtils.reinterpretAsKeyedStream(
        j_windows, jvm.KeyByKeySelector(), Types.ROW([Types.STRING()]).get_java_type_info()
    )
    return _ds.KeyedStream(j_keyed, window_type, stream), _ds.DataStream(j_late)
