package rtrec.flink;

import java.util.ArrayList;
import java.util.List;
import org.apache.flink.api.java.tuple.Tuple;
import org.apache.flink.api.java.tuple.Tuple2;
import org.apache.flink.streaming.api.functions.windowing.ProcessWindowFunction;
import org.apache.flink.streaming.api.windowing.windows.TimeWindow;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;

/**
 * A window of one key's (key, record) rows -> {@code Row(key, (key, [record, ...]))}: the
 * records of the window in arrival order, in the (key, value) layout PyFlink's keyed Python
 * operators read (see {@link FieldAsKey}). Its output timestamp is the window's last
 * millisecond, set by Flink's window operator.
 *
 * <p>rtrec's user stage buffers a user's events in Flink's own window operator, in the JVM,
 * and its Python function receives each closed window once: no Python timer per window and
 * no Python state write per event.
 */
public class WindowEvents extends ProcessWindowFunction<Row, Row, Row, TimeWindow> {

    private static final long serialVersionUID = 1L;

    @Override
    public void process(Row key, Context context, Iterable<Row> rows, Collector<Row> out) {
        List<Tuple> records = new ArrayList<>();
        for (Row row : rows) {
            records.add((Tuple) row.getField(1));
        }
        Object k = key.getField(0);
        out.collect(Row.of(k, Tuple2.of(k, records)));
    }
}
