"""An index's rows file, read one way: row i of the faiss index is row i of `<modality>.rows.arrow`.

The file is uncompressed Arrow IPC, memory-mapped: a search reads only the record batches that
hold its hits. Columns: id, path, caption, then any metadata columns the shards carried (manifest
columns, folder facts, sidecar fields), with the types they had in the shards.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from retriever.querybank import BIAS_COLUMN

BASE_COLUMNS = ("id", "path", "caption")
BASE_SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.string()), ("caption", pa.string())])
# Columns retriever keeps for itself: not metadata, not shown with hits. The querybank bias
# (retriever.querybank) is stored per row because it belongs to the row as much as its vector.
HIDDEN_COLUMNS = (BIAS_COLUMN,)


def rows_schema(metadata_fields: list[pa.Field] | tuple = (), *, querybank: bool = False) -> pa.Schema:
    """The rows file's schema: id, path, caption, the shards' metadata columns, then the querybank
    bias when the index has one."""
    fields = [f for f in metadata_fields if f.name not in HIDDEN_COLUMNS]
    return pa.schema([*BASE_SCHEMA, *fields, *([pa.field(BIAS_COLUMN, pa.float32())] if querybank else [])])


def with_column(batch: pa.RecordBatch, name: str, values: pa.Array) -> pa.RecordBatch:
    """`batch` with column `name` set to `values` (replaced if it is there)."""
    i = batch.schema.get_field_index(name)
    return batch.set_column(i, name, values) if i >= 0 else batch.append_column(name, values)


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """`batch` with exactly `schema`'s columns: missing ones null, others cast (strings if they cannot be).

    Rows added later (`index --add`) may come from shards with fewer or differently typed columns.
    """
    cols = []
    for f in schema:
        i = batch.schema.get_field_index(f.name)
        if i < 0:
            cols.append(pa.nulls(len(batch), f.type))
            continue
        col = batch.column(i)
        if col.type != f.type:
            try:
                col = col.cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                col = pa.array([None if v is None else str(v) for v in col.to_pylist()], f.type)
        cols.append(col)
    return pa.record_batch(cols, schema=schema)


def iter_file_batches(path: str | Path) -> Iterator[pa.RecordBatch]:
    """The record batches of a rows file in order; a damaged file raises the one-sentence UserError."""
    from retriever.indexes.files import damaged

    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        batches = reader.num_record_batches
    except (pa.ArrowException, OSError) as e:
        raise damaged(Path(path), e) from None
    for i in range(batches):
        try:
            batch = reader.get_batch(i)
        except (pa.ArrowException, OSError) as e:
            raise damaged(Path(path), e) from None
        yield batch


def file_schema(path: str | Path) -> pa.Schema:
    """A rows file's schema (its footer only); a damaged file raises the one-sentence UserError."""
    from retriever.indexes.files import damaged

    try:
        return pa.ipc.open_file(pa.memory_map(str(path), "r")).schema
    except (pa.ArrowException, OSError) as e:
        raise damaged(Path(path), e) from None


class RowsFile:
    """A memory-mapped rows file: take rows by faiss row number, or scan it whole for filters."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        from retriever.indexes.files import damaged

        if not self.path.is_file():
            raise damaged(self.path, FileNotFoundError("missing"))
        try:
            self._source = pa.memory_map(str(self.path), "r")
            reader = pa.ipc.open_file(self._source)
            self.schema: pa.Schema = reader.schema
            self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except (pa.ArrowException, OSError) as e:
            raise damaged(self.path, e) from None
        self.starts = np.cumsum([0] + [b.num_rows for b in self.batches])[:-1]
        self.num_rows = int(sum(b.num_rows for b in self.batches))

    @property
    def metadata_columns(self) -> list[str]:
        return [n for n in self.schema.names if n not in BASE_COLUMNS and n not in HIDDEN_COLUMNS]

    def float_column(self, name: str) -> np.ndarray:
        """Every row's value of a float column, in row order (one copy out of the mapped batches)."""
        parts = [b.column(name).to_numpy(zero_copy_only=False) for b in self.batches]
        return np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)

    def table(self) -> pa.Table:
        """Every row, zero-copy over the mapped batches (what filters scan)."""
        return pa.Table.from_batches(self.batches, schema=self.schema)

    def take(self, rows: np.ndarray) -> pa.Table:
        """The given faiss rows in the caller's order, reading only the record batches that hold them.

        Not Table.take: on a table of many record batches (one per 16k rows written) Arrow joins
        the chunks first, which made k = 10 cost 28 ms over 10M rows. Rows are grouped by batch,
        taken, and put back in the caller's order with one more take.
        """
        rows = np.asarray(rows, np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        groups, first = np.unique(which[order], return_index=True)
        bounds = [*first.tolist(), len(order)]
        parts = [
            self.batches[b].take(int64_array(rows[order[lo:hi]] - self.starts[b]))
            for b, lo, hi in zip(groups.tolist(), bounds, bounds[1:])
        ]
        if not parts:
            return self.schema.empty_table()
        table = pa.Table.from_batches(parts, schema=self.schema).combine_chunks()
        return table.take(int64_array(np.argsort(order, kind="stable")))

    def rows_where(self, column: str, values) -> np.ndarray:
        """Faiss rows whose `column` is one of `values` (a full scan; used for a query's own items)."""
        import pyarrow.compute as pc

        out = []
        for b, start in zip(self.batches, self.starts.tolist()):
            hit = pc.is_in(b.column(column), value_set=pa.array(list(values), self.schema.field(column).type))
            out.append(np.flatnonzero(hit.to_numpy(zero_copy_only=False)) + start)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def close(self) -> None:
        self.batches = []
        self._source.close()


def json_value(v: Any) -> Any:
    """A metadata value as JSON can carry it (timestamps and dates as ISO 8601 text)."""
    if isinstance(v, (_dt.datetime, _dt.date, _dt.time)):
        return v.isoformat()
    if isinstance(v, _dt.timedelta):
        return v.total_seconds()
    if isinstance(v, bytes):
        return v.hex()
    return v


def int64_array(a: np.ndarray) -> pa.Array:
    """A zero-copy Arrow view of int64 numbers. Not pa.array(numpy): that imports pandas (0.3-0.7 s of
    a cold query) to check whether its argument is a pandas object."""
    a = np.ascontiguousarray(a, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(a), [None, pa.py_buffer(a)])
