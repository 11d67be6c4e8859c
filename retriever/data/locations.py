"""Where an item's image bytes live: a file, a member of a tar shard, or a cell of a Parquet file.

An item's location is one string that search results, `retriever info`, training and the server
can all read back:

    /data/cats/001.jpg                    a file
    /data/shards/00007.tar#000070042      webdataset member(s) with key 000070042 (TAR#key)
    /data/train-00000.parquet#1234        row 1234 (0-based) of a Parquet file's image column (PARQUET#row)

A real file whose name contains `#` stays a file: the split is only tried when the whole string
is not an existing path. Torch-free.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

TAR_SUFFIXES = (".tar",)
PARQUET_SUFFIXES = (".parquet",)


def tar_location(tar: str | Path, key: str) -> str:
    return f"{tar}#{key}"


def parquet_location(parquet: str | Path, row: int) -> str:
    return f"{parquet}#{row}"


def split_location(location: str) -> tuple[str, str, str] | None:
    """(kind, container, key) for a tar or Parquet location, None for a plain path."""
    if "#" not in location or os.path.exists(location):
        return None
    container, _, key = location.rpartition("#")
    lower = container.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar", container, key
    if lower.endswith(PARQUET_SUFFIXES) and key.isdigit():
        return "parquet", container, key
    return None


def open_location(location: str | os.PathLike) -> Path | io.BytesIO:
    """What `PIL.Image.open` can read: the path itself, or the member's / cell's bytes.

    Raises OSError (FileNotFoundError, KeyError wrapped) / ValueError when the location does not
    resolve, which batch callers report per item like any decode failure.
    """
    text = os.fspath(location)
    parts = split_location(text)
    if parts is None:
        return Path(text)
    kind, container, key = parts
    if kind == "tar":
        from retriever.data.webdataset import read_tar_image

        return io.BytesIO(read_tar_image(container, key))
    from retriever.data.parquet_images import read_parquet_image

    return io.BytesIO(read_parquet_image(container, int(key)))


def read_location_bytes(location: str | os.PathLike) -> bytes:
    """The encoded image bytes at a location (for a server's image endpoint, an export, ...)."""
    src = open_location(location)
    return src.getvalue() if isinstance(src, io.BytesIO) else src.read_bytes()
