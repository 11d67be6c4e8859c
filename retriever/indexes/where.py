"""`--where`: a SQL WHERE condition over an index's rows file, evaluated by DuckDB.

The condition sees one table whose columns are the rows file's: id, path, caption and every
metadata column (see `retriever info INDEX`). Anything DuckDB accepts in a WHERE clause works:

    year >= 2020 AND camera IN ('X100', 'GR III')
    dir LIKE 'holidays/%' OR path GLOB '*/2023-*'
    NOT (width < 512) AND mtime > TIMESTAMP '2024-01-01'

A row where the condition is NULL (a missing value) does not match. The connection is in-memory
with file access disabled, so a condition can read nothing but the rows.
"""

from __future__ import annotations

import re

import numpy as np

from retriever.errors import UserError
from retriever.indexes.rows import RowsFile


def where_mask(rows: RowsFile, where: str) -> np.ndarray:
    """Boolean array over the rows file: True where `where` holds."""
    import duckdb

    text = (where or "").strip()
    if not text:
        raise UserError('The --where filter is empty; give a condition such as "year >= 2020".')
    if ";" in text:
        raise UserError(f"The --where filter {where!r} contains ';'; give one condition, not statements.")
    con = duckdb.connect(":memory:")
    try:
        con.register("rows", rows.table())
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        try:
            rel = con.sql(f"SELECT ({text}) AS m FROM rows")
            if str(rel.types[0]) != "BOOLEAN":
                raise UserError(
                    f"The --where filter {where!r} is not a condition (it gives {str(rel.types[0]).lower()} values, "
                    'not true/false); compare it with something, e.g. "year >= 2020".'
                )
            col = rel.to_arrow_table().column(0)
        except duckdb.Error as e:
            raise UserError(explain(e, where, rows)) from None
    finally:
        con.close()
    return col.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def explain(e: Exception, where: str, rows: RowsFile) -> str:
    """One sentence for DuckDB's error, naming the column concerned where it can."""
    message = str(e).splitlines()[0]
    message = re.sub(r"^\w+ Error: ", "", message)
    columns = ", ".join(f"{f.name} ({_type_name(f.type)})" for f in rows.schema)
    missing = re.search(r'Referenced column "([^"]+)" not found', message)
    if missing:
        return f"The --where filter names column {missing.group(1)!r}, which this index does not have; its columns are {columns}."
    mentioned = [f for f in rows.schema if re.search(rf"\b{re.escape(f.name)}\b", where)]
    if "Permission" in type(e).__name__:
        return f"The --where filter {where!r} could not be evaluated: it may only read the index's rows."
    if "Parser" in type(e).__name__:
        return f"The --where filter {where!r} is not a valid SQL condition ({message.rstrip('.')})."
    if mentioned:
        cols = ", ".join(f"{f.name} is {_type_name(f.type)}" for f in mentioned)
        return f"The --where filter {where!r} does not fit the column types ({cols}): {message.rstrip('.')}."
    return f"The --where filter {where!r} could not be evaluated: {message.rstrip('.')}; the columns are {columns}."


def _type_name(t) -> str:
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "text"
    if pa.types.is_integer(t):
        return "integer"
    if pa.types.is_floating(t):
        return "number"
    if pa.types.is_boolean(t):
        return "true/false"
    if pa.types.is_timestamp(t):
        return "timestamp"
    return str(t)
