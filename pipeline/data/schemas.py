"""The row contracts, as code: one `pyarrow.schema` per stage boundary.

Column names are an interface (tests, tools and users depend on them); see README "Row contracts".
`check(table, schema, where)` is called whenever a stage reads or writes a table.
"""

from __future__ import annotations

import pyarrow as pa


class SchemaError(ValueError):
    """A table that does not match its contract; the message names the column."""


ITEMS = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("reference", pa.string()),
        ("kind", pa.string()),
        ("choices", pa.list_(pa.string())),
        ("split", pa.string()),
        ("source", pa.string()),
    ]
)

QUARANTINE = pa.schema([("source", pa.string()), ("row", pa.string()), ("reason", pa.string())])

ANSWERS = pa.schema(
    list(ITEMS)
    + [
        ("competitor", pa.string()),
        ("model", pa.string()),
        ("sample", pa.int32()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("completion_tokens", pa.int32()),
        ("error", pa.string()),
    ]
)

MARKED = pa.schema(
    list(ANSWERS)
    + [
        ("correct", pa.bool_()),
        ("extracted", pa.string()),
        ("reason", pa.string()),
        ("marked_by", pa.string()),
    ]
)

# TRL's unpaired-preference format, plus provenance columns TRL ignores.
ON_POLICY = "target"  # the `competitor` of the recipe's on-policy rows: the SFT'd target's own answers
KTO = pa.schema(
    [
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("label", pa.bool_()),
        ("id", pa.string()),
        ("competitor", pa.string()),
        ("sample", pa.int32()),
    ]
)

PAIRS = pa.schema(
    [
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("id", pa.string()),
        ("chosen_competitor", pa.string()),
        ("rejected_competitor", pa.string()),
    ]
)

NEGATIVES = MARKED

REASONS = ("match", "mismatch", "no_answer", "truncated", "error", "llm_equal", "llm_not_equal")


def check_schema(actual: pa.Schema, schema: pa.Schema, where: str) -> None:
    """Raise SchemaError naming the first missing or mistyped column of `actual`."""
    missing = [f.name for f in schema if f.name not in actual.names]
    if missing:
        raise SchemaError(f"{where}: missing column(s) {missing}; has {actual.names}")
    for field in schema:
        found = actual.field(field.name).type
        if found != field.type and not pa.types.is_null(found):
            raise SchemaError(f"{where}: column {field.name!r} is {found}, expected {field.type}")


def check(table: pa.Table, schema: pa.Schema, where: str) -> pa.Table:
    """Return `table` with columns in contract order; raise SchemaError naming what is wrong."""
    check_schema(table.schema, schema, where)
    return table.select(schema.names).cast(schema)
