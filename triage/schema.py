"""The output dataset's one Arrow schema, the same in every file whatever its rows hold.

An all-null `errors` column in one block and strings in another would otherwise infer two
different types, and the folder would then fail to read back as one dataset.

`priority` and `category` are stored dictionary-encoded with every level in a fixed order,
so pandas reads them as categoricals with all their levels (a level no row has still shows
in `value_counts()`). Between stages they travel as plain strings (`WORKING_SCHEMA`);
`to_output` encodes them when a part file is written. Between stages a row also carries
`cached_prompt_tokens` (prompt tokens the provider read from its prompt cache, a part of
`prompt_tokens`): the driver counts them for the manifest and the cost; the output leaves them out.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from triage.programs import CATEGORIES, PRIORITIES

LEVELS: dict[str, tuple[str, ...]] = {"priority": PRIORITIES, "category": CATEGORIES}
_CATEGORICAL = pa.dictionary(pa.int8(), pa.string())


def _schema(categorical: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            pa.field("call_id", pa.string(), nullable=False),
            pa.field("transcript", pa.string()),
            pa.field("priority", categorical),
            pa.field("category", categorical),
            pa.field("summary", pa.string()),
            pa.field("location", pa.string()),
            pa.field("subject_description", pa.string()),
            pa.field("review", pa.string()),
            pa.field("errors", pa.string()),
            pa.field("model", pa.string()),
            pa.field("prompt_tokens", pa.int64(), nullable=False),
            pa.field("completion_tokens", pa.int64(), nullable=False),
            pa.field("triaged_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


WORKING_SCHEMA = _schema(pa.string()).append(pa.field("cached_prompt_tokens", pa.int64()))
OUTPUT_SCHEMA = _schema(_CATEGORICAL)
OUTPUT_COLUMNS: tuple[str, ...] = tuple(OUTPUT_SCHEMA.names)


def to_output(table: pa.Table) -> pa.Table:
    """`table` (working or output schema) in the output schema, categoricals with all their levels."""
    columns = []
    for field in OUTPUT_SCHEMA:
        column = table.column(field.name)
        if field.name in LEVELS:
            levels = pa.array(LEVELS[field.name], pa.string())
            values = column.cast(pa.string())
            indices = pc.index_in(values, value_set=levels).cast(pa.int8())
            chunks = [pa.DictionaryArray.from_arrays(chunk, levels) for chunk in indices.chunks] or [
                pa.DictionaryArray.from_arrays(pa.array([], pa.int8()), levels)
            ]
            columns.append(pa.chunked_array(chunks, field.type))
        else:
            columns.append(column.cast(field.type))
    return pa.table(columns, schema=OUTPUT_SCHEMA)
