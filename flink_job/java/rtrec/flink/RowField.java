package rtrec.flink;

import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.types.Row;

/** {@code Row(key, record)} -> record: undoes {@link FieldAsKey} (late window elements). */
public class RowField implements MapFunction<Row, Object> {

    private static final long serialVersionUID = 1L;

    private final int field;

    public RowField(int field) {
        this.field = field;
    }

    @Override
    public Object map(Row row) {
        return row.getField(field);
    }
}
