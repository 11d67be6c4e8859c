"""Sources whose images live inside container files: webdataset tar shards and image Parquet.

`read_container_source` recognises them (a `.tar`, a glob or brace expansion of tars, a folder
holding tars, a Parquet file with an image column, a folder or glob of such Parquet files) and
returns None for everything else, which `read_source` then reads as a folder or manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

from retriever.data import parquet_images, webdataset
from retriever.data.sources import SourceItem, SourceList
from retriever.errors import UserError


def read_container_source(
    source: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None
) -> SourceList | None:
    text = os.path.expanduser(os.fspath(source))
    path = Path(text)
    kind = _kind(path, text, image_column)
    if kind is None:
        return None
    if kind == "tar":
        rows, problems, n_files = webdataset.read_webdataset(text)
        what = "tar shard"
    else:
        files = webdataset.tar_paths(text, suffix=".parquet")
        rows, problems = [], []
        for f in files:
            if not f.is_file():
                problems.append({"path": str(f), "reason": "no such Parquet file"})
            elif not parquet_images.has_image_column(f, image_column):
                problems.append({"path": str(f), "reason": "no image column (binary or struct<bytes, path>)"})
            else:
                good, bad = parquet_images.read_image_parquet(f, image_column, caption_column)
                rows.extend(good)
                problems.extend(bad)
        n_files, what = len(files), "Parquet file"
    if not rows:
        first = f": {problems[0]['path']}: {problems[0]['reason']}" if problems else ""
        raise UserError(f"Source {text} has no readable images in its {n_files} {what}(s){first}.")
    items = SourceList(SourceItem(i, loc, caps, meta) for i, (loc, caps, meta) in enumerate(rows))
    items.skipped = problems
    return items


_SHARD_FOLDER_SUFFIXES = {".tar", ".parquet", ".json", ".txt", ".md"}


def _kind(path: Path, text: str, image_column: str | None) -> str | None:
    if path.is_dir():
        # Only a folder that holds nothing but shards and their sidecars (img2dataset's output:
        # NNNNN.tar, NNNNN.parquet, NNNNN_stats.json; HF's data/*.parquet): a photo folder with a
        # stray backup.tar or a manifest.parquet in it stays a photo folder.
        names = [p for p in path.iterdir() if not p.name.startswith(".")]
        if not names or any(p.is_dir() or p.suffix.lower() not in _SHARD_FOLDER_SUFFIXES for p in names):
            return None
        if any(p.suffix.lower() == ".tar" for p in names):
            return "tar"
        parquets = [p for p in names if p.suffix.lower() == ".parquet"]
        if parquets and parquet_images.has_image_column(parquets[0], image_column):
            return "parquet"
        return None
    lower = text.lower()
    if path.is_file():
        if lower.endswith(".tar"):
            return "tar"
        if lower.endswith(".parquet") and parquet_images.has_image_column(path, image_column):
            return "parquet"
        return None
    if webdataset.looks_like_tar_spec(text):
        return "tar"
    if lower.endswith(".parquet") and set("*?[{") & set(text):
        return "parquet"
    return None
