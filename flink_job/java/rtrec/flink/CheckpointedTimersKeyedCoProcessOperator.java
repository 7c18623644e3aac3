package rtrec.flink;

import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.streaming.api.functions.python.DataStreamPythonFunctionInfo;
import org.apache.flink.streaming.api.operators.python.process.AbstractExternalDataStreamPythonFunctionOperator;
import org.apache.flink.streaming.api.operators.python.process.ExternalPythonKeyedCoProcessOperator;
import org.apache.flink.types.Row;

/**
 * PyFlink's keyed co-process operator (process mode), with the timers a Python function
 * registered in the bundle that a checkpoint flushes included in that checkpoint; see
 * {@link CheckpointedTimersKeyedProcessOperator} for why.
 */
public class CheckpointedTimersKeyedCoProcessOperator<OUT>
        extends ExternalPythonKeyedCoProcessOperator<OUT> {

    private static final long serialVersionUID = 1L;

    public CheckpointedTimersKeyedCoProcessOperator(
            Configuration config,
            DataStreamPythonFunctionInfo pythonFunctionInfo,
            TypeInformation<Row> inputTypeInfo1,
            TypeInformation<Row> inputTypeInfo2,
            TypeInformation<OUT> outputTypeInfo) {
        super(config, pythonFunctionInfo, inputTypeInfo1, inputTypeInfo2, outputTypeInfo);
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
        return new CheckpointedTimersKeyedCoProcessOperator<>(
                config, pythonFunctionInfo, getLeftInputType(), getRightInputType(), outputTypeInfo);
    }
}
