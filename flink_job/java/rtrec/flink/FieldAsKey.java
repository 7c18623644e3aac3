package rtrec.flink;

import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.api.java.tuple.Tuple;
import org.apache.flink.types.Row;

/**
 * A tuple record -> {@code Row(record.f<field>, record)}: the (key, value) layout PyFlink's
 * keyed Python operators read, made in the JVM.
 *
 * <p>PyFlink's own {@code key_by} makes that row with a Python map function. Its records
 * cross into Python and back once more per record, and, as a separate operator chained
 * after a Python function that also has a side output, it holds what it has mapped until
 * its own bundle ends. Its bundle-time check is a mailbox action, which cannot run while a
 * watermark fires the previous operator's timers: samples of user windows fired by one
 * watermark reached the trainer only at that map's bundle size (20,000), seconds later.
 */
public class FieldAsKey implements MapFunction<Tuple, Row> {

    private static final long serialVersionUID = 1L;

    private final int field;

    public FieldAsKey(int field) {
        this.field = field;
    }

    @Override
    public Row map(Tuple record) {
        return Row.of(record.getField(field), record);
    }
}
