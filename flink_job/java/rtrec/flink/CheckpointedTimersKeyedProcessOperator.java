package rtrec.flink;

import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.java.typeutils.RowTypeInfo;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.streaming.api.functions.python.DataStreamPythonFunctionInfo;
import org.apache.flink.streaming.api.operators.python.process.AbstractExternalDataStreamPythonFunctionOperator;
import org.apache.flink.streaming.api.operators.python.process.ExternalPythonKeyedProcessOperator;

/**
 * PyFlink's keyed process operator (process mode), with the timers a Python function
 * registered in the bundle that a checkpoint flushes included in that checkpoint.
 *
 * <p>Flink 2.2's operator registers Python timers asynchronously: the Beam runner queues
 * each registration as a mailbox mail, and only a watermark advance drains them
 * synchronously. {@code prepareSnapshotPreBarrier} finishes the open bundle, so the
 * function's state writes of that bundle reach the state backend, but the timer mails run
 * after the snapshot. A checkpoint then holds keyed state whose timers it lacks, and after a
 * restore that state never fires (rtrec lost every pending event of users who sent nothing
 * more). Draining right after the bundle is finished makes state and timers consistent.
 */
public class CheckpointedTimersKeyedProcessOperator<OUT>
        extends ExternalPythonKeyedProcessOperator<OUT> {

    private static final long serialVersionUID = 1L;

    public CheckpointedTimersKeyedProcessOperator(
            Configuration config,
            DataStreamPythonFunctionInfo pythonFunctionInfo,
            RowTypeInfo inputTypeInfo,
            TypeInformation<OUT> outputTypeInfo) {
        super(config, pythonFunctionInfo, inputTypeInfo, outputTypeInfo);
    }

    @Override
    public void prepareSnapshotPreBarrier(long checkpointId) throws Exception {
        super.prepareSnapshotPreBarrier(checkpointId);
        drainUnregisteredTimers();
    }

    /** Operator chaining merges Python functions through copy(): keep this class. */
    @Override
    public <T> AbstractExternalDataStreamPythonFunctionOperator<T> copy(
            DataStreamPythonFunctionInfo pythonFunctionInfo, TypeInformation<T> outputTypeInfo) {
        return new CheckpointedTimersKeyedProcessOperator<>(
                config, pythonFunctionInfo, (RowTypeInfo) getInputTypeInfo(), outputTypeInfo);
    }
}
