package rtrec.flink;

import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.java.typeutils.RowTypeInfo;
import org.apache.flink.configuration.Configuration;
import org.apache.flink.python.PythonOptions;
import org.apache.flink.streaming.api.functions.python.DataStreamPythonFunctionInfo;
import org.apache.flink.streaming.api.operators.InternalTimer;
import org.apache.flink.streaming.api.operators.python.process.AbstractExternalDataStreamPythonFunctionOperator;
import org.apache.flink.streaming.api.operators.python.process.ExternalPythonKeyedProcessOperator;
import org.apache.flink.types.Row;

/**
 * PyFlink's keyed process operator (process mode), with the timers a Python function
 * registered in the bundle that a checkpoint flushes included in that checkpoint, and with
 * bundles of timers ended after the bundle time as bundles of elements are.
 *
 * <p>Flink 2.2's operator registers Python timers asynchronously: the Beam runner queues
 * each registration as a mailbox mail, and only a watermark advance drains them
 * synchronously. {@code prepareSnapshotPreBarrier} finishes the open bundle, so the
 * function's state writes of that bundle reach the state backend, but the timer mails run
 * after the snapshot. A checkpoint then holds keyed state whose timers it lacks, and after a
 * restore that state never fires (rtrec lost every pending event of users who sent nothing
 * more). Draining right after the bundle is finished makes state and timers consistent.
 *
 * <p>A watermark fires all of its due timers in one call, and the bundle-time check is a
 * mailbox action that cannot run in between, so a bundle of timers ended only at the
 * bundle size (20,000 by default: seconds of Python work). Its output reaches the next
 * stage only when a bundle ends, so while a backlog's watermark fired thousands of user
 * windows the trainer downstream received nothing, then everything at once. Sending a timer
 * to Python does not wait for Python, so the bundle's age says little here: a bundle of
 * timers is ended at as many timers as the Python function fired in one bundle time before
 * (measured on each bundle of timers; {@link #FIRST_TIMER_BUNDLE} before the first), or at
 * the bundle time.
 */
public class CheckpointedTimersKeyedProcessOperator<OUT>
        extends ExternalPythonKeyedProcessOperator<OUT> {

    private static final long serialVersionUID = 1L;

    /** Timers in a bundle before the Python function's timer rate has been measured. */
    static final int FIRST_TIMER_BUNDLE = 1000;

    private transient long maxBundleTimeMs;

    /** Timers sent in the open bundle, and when its first one was. */
    private transient int timersInBundle;

    private transient long timerBundleStartMs;

    /** Timers the Python function fires per bundle time (0 = not measured yet). */
    private transient double timersPerBundleTime;

    public CheckpointedTimersKeyedProcessOperator(
            Configuration config,
            DataStreamPythonFunctionInfo pythonFunctionInfo,
            RowTypeInfo inputTypeInfo,
            TypeInformation<OUT> outputTypeInfo) {
        super(config, pythonFunctionInfo, inputTypeInfo, outputTypeInfo);
    }

    @Override
    public void open() throws Exception {
        super.open();
        long configured = config.get(PythonOptions.MAX_BUNDLE_TIME_MILLS);
        maxBundleTimeMs =
                configured > 0 ? configured : PythonOptions.MAX_BUNDLE_TIME_MILLS.defaultValue();
    }

    @Override
    public void onEventTime(InternalTimer<Row, Object> timer) throws Exception {
        countTimer();
        super.onEventTime(timer);
        finishTimerBundleIfDue();
    }

    @Override
    public void onProcessingTime(InternalTimer<Row, Object> timer) throws Exception {
        countTimer();
        super.onProcessingTime(timer);
        finishTimerBundleIfDue();
    }

    private void countTimer() {
        if (timersInBundle++ == 0) {
            timerBundleStartMs = getProcessingTimeService().getCurrentProcessingTime();
        }
    }

    private void finishTimerBundleIfDue() throws Exception {
        if (elementCount == 0) {
            return; // the super call finished the bundle (its size)
        }
        long now = getProcessingTimeService().getCurrentProcessingTime();
        double cap = timersPerBundleTime > 0 ? timersPerBundleTime : FIRST_TIMER_BUNDLE;
        if (timersInBundle >= Math.max(1.0, cap) || now - timerBundleStartMs >= maxBundleTimeMs) {
            invokeFinishBundle();
        }
    }

    /** Measures the Python function's timer rate on every bundle that held timers. */
    @Override
    protected void invokeFinishBundle() throws Exception {
        // Reset first: finishing may run a held watermark, whose timers open the next bundle.
        int timers = timersInBundle;
        long start = timerBundleStartMs;
        timersInBundle = 0;
        super.invokeFinishBundle(); // a bundle that held timers is never empty: it ends here
        if (timers > 0) {
            long took = getProcessingTimeService().getCurrentProcessingTime() - start;
            timersPerBundleTime = timers * (double) maxBundleTimeMs / Math.max(1L, took);
        }
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
