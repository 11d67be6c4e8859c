"""Parquet files that hold the images themselves, not paths to them.

Two layouts are common:
- img2dataset `--output_format parquet`: a binary column (`jpg`, `png`, `webp`) of encoded image
  bytes beside `caption`, `key`, `url`, `width`, ...;
- Hugging Face `datasets` image columns: `struct<bytes: binary, path: string>` cells (bytes may be
  null when `path` points at a file).

Reading a source touches only the small columns (projection): one item per row, located at
`PARQUET#row` (0-based row in the file), captions from the caption column, every other scalar
column kept as metadata. The image bytes are read only when an item is decoded, one row group at a
time (the last one stays cached per process, so a DataLoader walking rows in order reads each row
group once). A cell that is null or not an image fails that item alone, reported like any decode
error. A caption cell that is not honest text (bytes that are not UTF-8 or BOM-marked UTF-16, a
struct, a number) leaves its row out, reported with the reason, as every other source does
(sources.decode_caption); row numbers in locations stay the file's own.
"""

from __future__ import annotations

import bisect
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from retriever.data.locations import parquet_location
from retriever.data.manifests import is_metadata_type
from retriever.data.sources import _captions_of
from retriever.errors import UserError

IMAGE_BYTES_COLUMN_GUESSES = ("image", "jpg", "jpeg", "png", "webp", "img", "image_bytes")
CAPTION_GUESSES = ("caption", "text", "txt", "captions", "title", "description")


def is_image_type(t: pa.DataType) -> bool:
    """Binary cells, or HF's struct<bytes, path>."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0


def image_column_of(schema: pa.Schema, wanted: str | None = None) -> str | None:
    """The column holding image bytes, or None when the file is a manifest of paths."""
    if wanted is not None:
        return wanted if wanted in schema.names and is_image_type(schema.field(wanted).type) else None
    candidates = [f.name for f in schema if is_image_type(f.type)]
    for guess in IMAGE_BYTES_COLUMN_GUESSES:
        if guess in candidates:
            return guess
    # Any other binary column (a thumbnail, a hash) does not make a manifest of paths an image file;
    # HF's struct<bytes, path> is unambiguous whatever its name.
    return next((c for c in candidates if pa.types.is_struct(schema.field(c).type)), None)


def has_image_column(path: str | Path, wanted: str | None = None) -> bool:
    try:
        return image_column_of(pq.read_schema(path), wanted) is not None
    except (OSError, pa.ArrowException):
        return False


def read_image_parquet(
    path: Path, image_column: str | None = None, caption_column: str | None = None
) -> tuple[list[tuple[str, tuple[str, ...], dict[str, Any]]], list[dict[str, str]]]:
    """(location, captions, metadata) per row of one image Parquet file, streaming small columns,
    and the rows left out because their caption is not text ({"path", "reason"} each)."""
    path = path.resolve()
    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise UserError(f"Could not read Parquet file {path}: {e}") from e
    schema = pf.schema_arrow
    img = image_column_of(schema, image_column)
    if img is None:
        raise UserError(f"{path} has no image column (binary or struct<bytes, path>).")
    if caption_column is not None and caption_column not in schema.names:
        raise UserError(f"{path} has no column {caption_column!r}; its columns are {', '.join(schema.names)}.")
    cap = caption_column or next((c for c in CAPTION_GUESSES if c in schema.names), None)
    meta_cols = [f.name for f in schema if f.name not in (img, cap) and is_metadata_type(f.type)]
    columns = ([cap] if cap else []) + meta_cols
    rows: list[tuple[str, tuple[str, ...], dict[str, Any]]] = []
    skipped: list[dict[str, str]] = []
    if not columns:
        return [(parquet_location(path, i), (), {}) for i in range(pf.metadata.num_rows)], skipped
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=65_536, columns=columns):
            caps = batch.column(cap).to_pylist() if cap else [None] * len(batch)
            metas = batch.select(meta_cols).to_pylist() if meta_cols else [{}] * len(batch)
            for c, m in zip(caps, metas):
                try:
                    rows.append((parquet_location(path, row), _captions(c), m))
                except ValueError as e:
                    skipped.append({"path": parquet_location(path, row), "reason": f"caption: {e}"})
                row += 1
    except (OSError, pa.ArrowException) as e:  # a damaged row group: the rows before it are kept
        skipped.append({"path": str(path), "reason": f"unreadable after row {row} ({type(e).__name__}: {e})"})
    return rows, skipped


def _captions(value: Any) -> tuple[str, ...]:
    """The distinct captions of a cell; ValueError when it is not text (sources._captions_of)."""
    out: list[str] = []
    for c in _captions_of(value):
        if c not in out:
            out.append(c)
    return tuple(out)


@lru_cache(maxsize=16)
def _layout(path: str, mtime_ns: int) -> tuple[pq.ParquetFile, str, list[int]]:
    pf = pq.ParquetFile(path)
    img = image_column_of(pf.schema_arrow)
    if img is None:
        raise ValueError(f"{Path(path).name} has no image column")
    starts = [0]
    for rg in range(pf.metadata.num_row_groups):
        starts.append(starts[-1] + pf.metadata.row_group(rg).num_rows)
    return pf, img, starts


@lru_cache(maxsize=2)
def _row_group(path: str, mtime_ns: int, rg: int) -> pa.Array:
    pf, img, _ = _layout(path, mtime_ns)
    return pf.read_row_group(rg, columns=[img]).column(0).combine_chunks()


def read_parquet_image(path: str | Path, row: int) -> bytes:
    """Encoded image bytes of row `row` (0-based); ValueError for a null or non-image cell."""
    p = str(path)
    mtime = os.stat(p).st_mtime_ns  # FileNotFoundError when the file is gone: reported per item
    _, img, starts = _layout(p, mtime)
    if not 0 <= row < starts[-1]:
        raise ValueError(f"{Path(p).name} has no row {row}")
    rg = bisect.bisect_right(starts, row) - 1
    cell = _row_group(p, mtime, rg)[row - starts[rg]].as_py()
    if isinstance(cell, dict):
        data, ref = cell.get("bytes"), cell.get("path")
        if data is None and ref:
            ref_path = Path(ref) if os.path.isabs(ref) else Path(p).parent / ref
            return ref_path.read_bytes()
        cell = data
    if cell is None:
        raise ValueError(f"row {row} of {Path(p).name} has no image ({img} is null)")
    if not isinstance(cell, (bytes, bytearray)):
        raise ValueError(f"row {row} of {Path(p).name}: {img} is not image bytes")
    return bytes(cell)
