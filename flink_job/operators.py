"""rtrec's Java operators (flink_job/java) in place of PyFlink's keyed Python operators.

PyFlink 2.2 (process mode) registers the timers a Python function sets asynchronously, as
mailbox mails that run after the checkpoint which flushed their bundle. That checkpoint then
holds keyed state without the timer that would fire it: after a restore the state waits
forever. The subclasses in flink_job/java drain those registrations into the checkpoint
(and the keyed process one ends a bundle of timers by the bundle time, which PyFlink's
does only for elements); this module makes PyFlink's graph builder instantiate them for
every keyed process / keyed co-process function (docs/pyflink-notes.md).

:func:`key_by_field` keys a stream of tuples in the JVM (``FieldAsKey``) instead of with
PyFlink's Python key map; :func:`windows_by_field` keeps tumbling windows in Flink's own
window operator. PyFlink internals are reached through :mod:`flink_job.pyflink_compat`.

The operator jar (infra.jars.operators_jar) must be in ``pipeline.jars`` of the job;
flink_job.job.make_env adds it and calls :func:`use_checkpointed_timers`.
"""

from __future__ import annotations

from pyflink.common import Types

from flink_job import pyflink_compat as compat

PACKAGE = "rtrec.flink"
_PYFLINK = "org.apache.flink.streaming.api.operators.python.process."
# PyFlink's process-mode operator -> rtrec's subclass (thread mode is not used by rtrec).
REPLACES = {
    _PYFLINK + "ExternalPythonKeyedProcessOperator": "CheckpointedTimersKeyedProcessOperator",
    _PYFLINK + "ExternalPythonKeyedCoProcessOperator": "CheckpointedTimersKeyedCoProcessOperator",
}


def _ours(j_op, func_type, *inputs):
    """rtrec's operator with ``j_op``'s function and types, or ``j_op`` if not replaced
    (stateless functions; windows, whose operator has a window namespace)."""
    name = REPLACES.get(j_op.getClass().getName())
    if name is None or not compat.is_keyed_process(func_type):
        return j_op
    cls = getattr(getattr(compat.jvm(), PACKAGE), name)
    return cls(
        j_op.getConfiguration(), j_op.getPythonFunctionInfo(), *inputs, j_op.getProducedType()
    )


def use_checkpointed_timers() -> None:
    """Make PyFlink build keyed (co-)process operators from rtrec's subclasses (idempotent,
    for this Python process)."""
    compat.hook_python_operators(_ours)


def key_by_field(stream, field: int, key_type=None):
    """``stream.key_by(lambda r: r[field], key_type)`` for a stream of tuple records, with the
    (key, record) rows made in the JVM (``rtrec.flink.FieldAsKey``) instead of by a Python map.

    Same partitioning and the same input layout for the keyed Python function downstream;
    one Python pass per record less, and no Python map whose bundle holds the records it has
    keyed while the operator before it fires timers (see FieldAsKey.java).
    """
    j_keyed, record_type = _keyed_in_jvm(stream, field, key_type or Types.STRING())
    return compat.keyed_stream(j_keyed, record_type, stream)


def _keyed_in_jvm(stream, field: int, key_type):
    """The Java keyed stream of ``Row(record[field], record)`` rows, and the records' type."""
    record_type = compat.output_type(stream)
    keyed_rows = (
        compat.java_stream(stream)
        .map(
            getattr(compat.jvm(), PACKAGE).FieldAsKey(field),
            Types.ROW([key_type, record_type]).get_java_type_info(),
        )
        .name(f"key-by-field-{field}")
    )
    j_keyed = keyed_rows.keyBy(
        compat.row_key_selector(), Types.ROW([key_type]).get_java_type_info()
    )
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
    jvm = compat.jvm()
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
        j_windows, compat.row_key_selector(), Types.ROW([Types.STRING()]).get_java_type_info()
    )
    return compat.keyed_stream(j_keyed, window_type, stream), compat.data_stream(j_late)
