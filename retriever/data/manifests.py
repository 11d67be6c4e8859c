"""CSV/TSV/Parquet manifests read in streaming batches into compact Arrow columns.

Reading a manifest row by row into Python dicts costs about a kilobyte per row (10M rows: over
10 GB). Here pyarrow streams the file in batches, projected to the columns we use (image path,
caption, scalar metadata; binary and nested columns are never read), paths are made absolute per
batch, and the result stays in Arrow buffers: a `ManifestItems` sequence builds each `SourceItem`
only when it is asked for. Peak memory is then about the bytes of the kept columns (measured in
benchmarks/bench_manifest.py).

CSV/TSV cells are read as bytes; each metadata column is then typed over all its cells with Arrow
casts (integer, number, true/false, else text; blank cells null), so --where compares numbers.

Row order is kept: item ids are positions of first appearance, exactly as before, so resumes
and shard ids do not change. Rows naming the same image merge, their captions kept in order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retriever.errors import UserError

BATCH_ROWS = 65_536


def is_metadata_type(t: pa.DataType) -> bool:
    """Whether a Parquet column of this type becomes a metadata column: text, numbers, booleans."""
    return (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_integer(t)
        or pa.types.is_floating(t)
        or pa.types.is_boolean(t)
    )


class _Column:
    """Row access into a chunked column without combining it (which would copy it whole)."""

    def __init__(self, col: pa.ChunkedArray | pa.Array):
        self.col = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col], col.type)
        self.starts = np.cumsum([0] + [len(c) for c in self.col.chunks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, i: int) -> Any:
        c = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.col.chunks[c][i - int(self.starts[c])].as_py()

    def values(self, lo: int, hi: int) -> list:
        """Rows lo..hi as Python values, converted in bulk (≈ 50× faster than one by one)."""
        return self.col.slice(lo, hi - lo).to_pylist()


class ManifestItems(Sequence):
    """The items of a manifest, materialised as `SourceItem`s only when asked for (in bulk for slices
    and iteration)."""

    BLOCK = 8192  # rows converted per step when iterating

    def __init__(self, table: pa.Table, caption_column: str | None, groups: pa.Array | None):
        # table columns: "path" (absolute), caption column (optional), metadata columns.
        self._cap = _Column(groups if groups is not None else table.column(caption_column)) if caption_column else None
        self._merged = groups is not None  # caption cells are lists of every merged row's caption cell
        self._meta = {
            c: _Column(table.column(c)) for c in table.column_names if c not in ("path", "_row", caption_column)
        }
        self._paths = _Column(table.column("path"))
        self.skipped: list[dict] = []  # rows left out ({"path", "reason"}), as SourceList.skipped
        self.not_images = 0  # as SourceList: a manifest names images only

    def __len__(self) -> int:
        return len(self._paths)

    @property
    def metadata_fields(self) -> list[pa.Field]:
        """The shard fields of the metadata columns, read off the Arrow types: what
        `shards.metadata_fields` infers from every item's values, without a pass over the rows."""
        from retriever.shards import metadata_key

        return [pa.field(metadata_key(c), _shard_type(col.col.type)) for c, col in self._meta.items()]

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> list: ...
    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            if step == 1:
                return self._items(lo, max(lo, hi))
            return [self._items(j, j + 1)[0] for j in range(lo, hi, step)]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._items(i, i + 1)[0]

    def __iter__(self):
        for lo in range(0, len(self), self.BLOCK):
            yield from self._items(lo, min(lo + self.BLOCK, len(self)))

    def _items(self, lo: int, hi: int) -> list:
        from retriever.data.sources import SourceItem, _captions_of

        paths = self._paths.values(lo, hi)
        cells = self._cap.values(lo, hi) if self._cap is not None else [None] * (hi - lo)
        metas = {c: col.values(lo, hi) for c, col in self._meta.items()}
        out = []
        for j, (p, cell) in enumerate(zip(paths, cells)):
            if self._merged:
                caps: list[str] = []
                for value in cell or ():
                    caps.extend(c for c in _captions_of(value) if c not in caps)
            else:
                caps = _captions_of(cell)  # checked to be text when read (_honest_captions)
            out.append(SourceItem(lo + j, p, tuple(caps), {c: _text(v[j]) for c, v in metas.items()}))
        return out


def _shard_type(t: pa.DataType) -> pa.DataType:
    """The type Arrow gives the column's Python values (int64, float64, bool, string)."""
    if pa.types.is_integer(t):
        return pa.int64()
    if pa.types.is_floating(t):
        return pa.float64()
    if pa.types.is_boolean(t):
        return pa.bool_()
    return pa.string()


def _text(value: Any) -> Any:
    """CSV metadata cells are read as bytes (so bad UTF-8 costs a replacement character, not the file).

    Captions never come here undecoded: `_honest_captions` decodes or refuses them when read."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, list):
        return [_text(v) for v in value]
    return value


def read_manifest_streaming(
    path: Path, kind: str, pick_image: Any, pick_caption: Any, image_column: str | None, caption_column: str | None
) -> ManifestItems:
    """Stream a csv/tsv/parquet manifest. `pick_image(columns, wanted)` / `pick_caption` choose columns."""
    try:
        schema, batches = _open(path, kind)
        img_col = pick_image(schema.names, image_column)
        cap_col = pick_caption(schema.names, caption_column)
        meta_cols = [f.name for f in schema if f.name not in (img_col, cap_col) and _keep(f.type, kind)]
        keep = [img_col] + ([cap_col] if cap_col else []) + meta_cols
        base = str(path.resolve().parent)
        pieces = []
        skipped: list[dict] = []
        offset = 0
        for batch in batches(keep):
            piece = _normalise(batch, img_col, base, offset)
            pieces.append(_honest_captions(piece, cap_col, skipped) if cap_col else piece)
            offset += len(batch)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"Could not read manifest {path}: {e}") from e
    names = ["path", *([cap_col] if cap_col else []), *meta_cols, "_row"]
    table = (
        pa.Table.from_batches(pieces).select(names)
        if pieces
        else pa.table({n: pa.array([], pa.string()) for n in names})
    )
    pieces.clear()
    groups = None
    if len(table) and pc.count_distinct(table.column("path")).as_py() != len(table):
        table, groups = _merge_duplicates(table, cap_col)
    table = table.drop_columns(["_row"])
    if kind != "parquet":  # CSV cells arrive as bytes: type each metadata column over all its cells
        for name in meta_cols:
            table = table.set_column(table.schema.get_field_index(name), name, typed_column(table.column(name)))
    items = ManifestItems(table, cap_col, groups)
    items.skipped = skipped
    pa.default_memory_pool().release_unused()
    return items


def typed_column(cells: pa.ChunkedArray) -> pa.ChunkedArray:
    """A CSV column's cells (bytes) as the narrowest type every non-empty cell fits: integer, then
    number, then true/false, else text; empty (or blank) cells become nulls.

    Decided over the whole column with Arrow casts, not from the first block as pyarrow.csv's own
    inference does, so a value that only appears late in a large manifest changes the column's
    type instead of failing the read.
    """
    text = _utf8(cells)
    blank = pc.equal(pc.utf8_trim_whitespace(text), "")
    text = pc.if_else(blank, pa.scalar(None, pa.string()), text)
    filled = pc.utf8_trim_whitespace(text)
    if filled.null_count == len(filled):
        return text
    for t in (pa.int64(), pa.float64()):
        try:
            return pc.cast(filled, t)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    low = pc.utf8_lower(filled)
    if pc.all(pc.or_(pc.is_null(low), pc.is_in(low, pa.array(["true", "false"])))).as_py():
        return pc.equal(low, "true")
    return text


def _utf8(cells: pa.ChunkedArray) -> pa.ChunkedArray:
    try:
        return pc.cast(cells, pa.string())
    except pa.ArrowInvalid:  # invalid UTF-8: replacement characters for that column only
        return pa.chunked_array([pa.array([_text(v) for v in cells.to_pylist()], pa.string())], pa.string())


def _keep(t: pa.DataType, kind: str) -> bool:
    if kind != "parquet":
        return True  # CSV columns are all read as bytes
    return is_metadata_type(t)


def _open(path: Path, kind: str):
    if kind == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path, pre_buffer=False)

        def parquet_batches(columns):
            yield from pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)

        return pf.schema_arrow, parquet_batches
    import pyarrow.csv as pcsv

    parse = pcsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",", newlines_in_values=True)
    read = pcsv.ReadOptions(block_size=16 << 20)
    header = pcsv.open_csv(path, read_options=read, parse_options=parse).schema

    def csv_batches(columns):
        convert = pcsv.ConvertOptions(
            column_types={c: pa.binary() for c in header.names}, include_columns=columns, strings_can_be_null=False
        )
        reader = pcsv.open_csv(path, read_options=read, parse_options=parse, convert_options=convert)
        yield from reader

    return header, csv_batches


_NEEDS_PYTHON = r"(^~)|(^|/)\.\.?(/|$)|//|\\"  # ~, . or .. segments, doubled or back slashes


def _normalise(batch: pa.RecordBatch, img_col: str, base: str, offset: int) -> pa.RecordBatch:
    """Replace the image column by absolute, normalised paths and drop rows without one.

    Vectorised in Arrow for plain paths (absolute, or relative without dot segments); only the
    rest go through os.path.normpath one by one.
    """
    col = batch.column(img_col)
    try:
        text = pc.utf8_trim_whitespace(col.cast(pa.string()))
    except pa.ArrowInvalid:  # invalid UTF-8 in a CSV path: decode with replacement characters
        text = pa.array([None if v is None else _text(v).strip() for v in col.to_pylist()], pa.string())
    absolute = pc.starts_with(text, "/")
    joined = pc.if_else(absolute, text, pc.binary_join_element_wise(base, text, "/"))
    odd = pc.fill_null(pc.match_substring_regex(text, _NEEDS_PYTHON), False)
    if pc.any(odd).as_py():
        fixed = [
            os.path.normpath(os.path.join(base, os.path.expanduser(t))) if o else j
            for t, j, o in zip(text.to_pylist(), joined.to_pylist(), odd.to_pylist())
        ]
        joined = pa.array(fixed, pa.string())
    keep = pc.and_(pc.is_valid(text), pc.not_equal(pc.fill_null(text, ""), ""))
    cols = {"path": joined, **{n: batch.column(n) for n in batch.schema.names if n != img_col}}
    cols["_row"] = pa.array(np.arange(offset, offset + len(batch)))
    return pa.RecordBatch.from_pydict(cols).filter(keep)


def _honest_captions(batch: pa.RecordBatch, cap_col: str, skipped: list[dict]) -> pa.RecordBatch:
    """The batch with its caption column as text, less the rows whose caption is not honest text.

    Bytes (every CSV cell, Parquet binary) are decoded as UTF-8 (a BOM dropped) or BOM-marked
    UTF-16, in bulk when the whole batch is valid UTF-8; cells holding anything else (a struct, a
    number, bytes that are not text) are left out and listed in `skipped` as {"path", "reason"},
    the rule `sources.read_source_manifest` applies to JSONL. Rows are dropped before ids are
    given, so ids stay positions of first appearance among the rows kept, run after run.
    """
    from retriever.data.sources import _captions_of, decode_caption

    col = batch.column(cap_col)
    t = col.type
    bad: dict[int, str] = {}
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        text: pa.Array = col.cast(pa.string())
    elif (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type)
    ):
        text = col.cast(pa.list_(pa.string()))
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        text = _decode_bytes(col, decode_caption, bad)
    else:  # structs, numbers, lists of bytes or structs: cell by cell, as lists of captions
        cells: list[list[str] | None] = []
        for i, value in enumerate(col.to_pylist()):
            try:
                cells.append(_captions_of(value))
            except ValueError as e:
                bad[i] = str(e)
                cells.append(None)
        text = pa.array(cells, pa.list_(pa.string()))
    cols = {n: (text if n == cap_col else batch.column(n)) for n in batch.schema.names}
    out = pa.RecordBatch.from_pydict(cols)
    if not bad:
        return out
    paths = batch.column("path").to_pylist()
    skipped.extend({"path": paths[i], "reason": f"caption: {reason}"} for i, reason in sorted(bad.items()))
    return out.filter(pa.array([i not in bad for i in range(len(batch))]))


def _decode_bytes(col: pa.Array, decode_caption: Any, bad: dict[int, str]) -> pa.Array:
    """Byte cells as text; the reason per cell that is not text goes into `bad`."""
    try:
        text = col.cast(pa.string())  # valid UTF-8 throughout: the common case, in bulk
    except pa.ArrowInvalid:
        text = None
    if text is not None and not pc.any(pc.fill_null(pc.match_substring(text, "\x00"), False)).as_py():
        return pc.replace_substring_regex(text, "^\ufeff", "")  # a BOM, as utf-8-sig drops it
    cells: list[str | None] = []
    for i, value in enumerate(col.to_pylist()):
        try:
            cells.append(None if value is None else decode_caption(value))
        except ValueError as e:
            bad[i] = str(e)
            cells.append(None)
    return pa.array(cells, pa.string())


def _merge_duplicates(table: pa.Table, cap_col: str | None) -> tuple[pa.Table, pa.Array | None]:
    """One row per path in order of first appearance; captions of all its rows as a list."""
    # Rows are grouped by number, not by caption: Arrow's list aggregate has no kernel for list
    # cells (a Parquet list<string> caption column), and row numbers take any caption type.
    grouped = table.select(["path", "_row"]).group_by("path", use_threads=False)
    g = grouped.aggregate([("_row", "min"), ("_row", "list")])
    order = pc.sort_indices(g.column("_row_min"))
    g = g.take(order)
    first = g.column("_row_min")
    # Row positions in `table` of each item's first row (table is in _row order already).
    pos = pc.index_in(first, value_set=table.column("_row"))
    kept = table.take(pos)
    if not cap_col:
        return kept, None
    rows = g.column("_row_list").combine_chunks()
    cells = table.column(cap_col).take(pc.index_in(pc.list_flatten(rows), value_set=table.column("_row")))
    groups = pa.ListArray.from_arrays(rows.offsets, cells.combine_chunks())
    return kept, groups
