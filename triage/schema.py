"""The output dataset's one Arrow schema, the same in every file whatever its rows hold.

An all-null `errors` column in one block and strings in another would otherwise infer two
different types, and the folder would then fail to read back as one dataset.
"""

from __future__ import annotations

import pyarrow as pa

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("call_id", pa.string(), nullable=False),
        pa.field("transcript", pa.string()),
        pa.field("priority", pa.string()),
        pa.field("category", pa.string()),
        pa.field("summary", pa.string()),
        pa.field("location", pa.string()),
        pa.field("subject_description", pa.string()),
        pa.field("errors", pa.string()),
        pa.field("model", pa.string()),
        pa.field("prompt_tokens", pa.int64(), nullable=False),
        pa.field("completion_tokens", pa.int64(), nullable=False),
        pa.field("triaged_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

OUTPUT_COLUMNS: tuple[str, ...] = tuple(OUTPUT_SCHEMA.names)
