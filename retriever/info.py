"""What a shard folder or an index folder holds (what `retriever info` prints): `folder_info(path)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retriever.errors import UserError
from retriever.indexes.manifest import MANIFEST, read_index_manifest
from retriever.indexes.rows import HIDDEN_COLUMNS, file_schema
from retriever.parts import ERRORS_PREFIX, errors_files, parts_status
from retriever.shards import ShardSet
from retriever.skipped import read_skipped


def folder_info(path: str | Path, check: bool = False) -> dict[str, Any]:
    """What `retriever info` shows; an index's files are opened first, so a damaged one is refused.

    Args:
        path: a shard folder or an index folder.
        check: read each faiss index whole, as a search would (the default reads headers only).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{p} does not exist.")
    if (p / MANIFEST).is_file():
        from retriever.indexes.files import check_index

        m = read_index_manifest(p)
        for entry in m.indexes.values():
            check_index(p, entry, deep=check)
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        d = {"kind": "index", "path": str(p.resolve()), "bytes": size, **m.to_dict()}
        for name, entry in m.indexes.items():  # what --where can filter on and hits carry
            schema = file_schema(p / entry.rows_file)
            d["indexes"][name]["columns"] = {f.name: str(f.type) for f in schema if f.name not in HIDDEN_COLUMNS}
        return d
    ss = ShardSet(p)
    files = errors_files(p)  # _errors.jsonl, or one per part when embedded in parts
    n_errors = sum(len(read_skipped(p, f.name)) for f in files)
    return {
        "kind": "shards",
        "path": str(ss.folder),
        "rows": ss.num_rows,
        "rows_with_caption": ss.count("text"),
        "shards": len(ss.shards),
        "bytes": sum(s.path.stat().st_size for s in ss.shards),
        "skipped_images": n_errors,
        "errors_file": (str(files[0]) if len(files) == 1 else str(p / f"{ERRORS_PREFIX}*.jsonl")) if n_errors else None,
        "metadata_columns": {f.name: str(f.type) for f in ss.metadata_fields},
        **{k: v for k, v in ss.meta.items()},
        "parts": parts_status(p),
    }


def to_json(d: dict[str, Any]) -> str:
    return json.dumps(d, indent=2, default=str)
