"""Append new shards to a built index without retraining (`retriever index --add NEW INDEX`).

The trained quantizer, PQ codebooks and graph are reused; the new vectors are encoded and added
as rows count, count+1, … after the existing ones. Every file is written into a new copy of the
index folder that replaces the old one in one rename (fsutil.atomic_dir): a reader sees the old
index or the new one, never a mix. Immutable files (vectors segments, the trained empty index)
are hard-linked, not copied.

Ids stay unique: shards whose ids are already in the index are refused, unless `renumber=True`,
which shifts every new id by one offset so that they follow the index's largest id. The offset is
recorded in the manifest (`shards.added[i].id_offset`): source position = id - id_offset.
"""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retriever.atomic import atomic_dir, write_json_atomic
from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.indexes import ondisk
from retriever.indexes.build import BuildProgress, add_batches
from retriever.indexes.manifest import MANIFEST, IndexManifest, read_index_manifest
from retriever.indexes.rows import file_schema
from retriever.indexes.settings import configure_faiss
from retriever.parts import missing_parts
from retriever.shards import ShardSet


def add_to_index(
    index_dir: str | Path,
    new_shards: str | Path | ShardSet,
    *,
    renumber: bool = False,
    batch_size: int = 16_384,
    progress: BuildProgress | None = None,
) -> IndexManifest:
    """Append the rows of `new_shards` to an existing index folder without retraining it.

    Args:
        index_dir: the index folder (`build_index`); rewritten atomically.
        new_shards: a shard folder (or `ShardSet`) made with the index's model.
        renumber: shift the new row ids past the index's largest id instead of refusing clashing ids.
        batch_size: vectors added per faiss call.
        progress: called with (modality, rows done, rows to do).

    Returns:
        The new `IndexManifest`.
    """
    configure_faiss()
    index_dir = Path(index_dir).expanduser()
    manifest = read_index_manifest(index_dir)
    ss = new_shards if isinstance(new_shards, ShardSet) else ShardSet(new_shards)
    missing_parts(ss.folder)
    ModelIdentity.from_dict(manifest.model).check_same(ss.identity, f"Shard folder {ss.folder}")
    if ss.count("text") and "text" not in manifest.indexes:
        raise UserError(
            f"{ss.folder} has captions but index {index_dir} has no text index to add them to; "
            "rebuild it with `retriever index` over all shards."
        )
    offset = _id_offset(index_dir, manifest, ss, renumber)
    with atomic_dir(index_dir) as tmp:
        for modality, old in manifest.indexes.items():
            entry = copy.deepcopy(old)
            for name in [*old.vectors_files, old.trained_file]:
                if name:
                    _link(index_dir / name, tmp / name)
            n_new = ss.count(modality)
            if n_new == 0:
                for name in (old.file, old.rows_file, old.ivfdata_file):
                    if name:
                        _link(index_dir / name, tmp / name)
                continue
            old_ivf = ondisk.open_on_disk(index_dir / old.file) if old.ivfdata_file else None
            index = old_ivf if old_ivf is not None else faiss.read_index(str(index_dir / old.file))
            # Rows keep the index's columns: new shards' extra columns are dropped, missing ones null.
            schema = file_schema(index_dir / old.rows_file)
            wanted = [c for c in schema.names if c in ss.column_names]
            batches = _shift_ids(ss.iter_vectors(modality, batch_size, extra_columns=wanted), offset)
            index = add_batches(
                index,
                entry,
                tmp,
                batches,
                n_new,
                schema=schema,
                first_row=old.count,
                old_rows=index_dir / old.rows_file,
                old_ivf=old_ivf,
                progress=progress,
            )
            if not entry.ivfdata_file:
                faiss.write_index(index, str(tmp / entry.file))
            entry.count = int(index.ntotal)
            if "tuning" in entry.extra:
                # The parameters were tuned on fewer rows; recall may drift as the index grows.
                entry.extra["tuning"].setdefault("tuned_at_count", old.count)
            manifest.indexes[modality] = entry
            del index, old_ivf
        manifest.shards.setdefault("added", []).append(
            {
                "folder": str(ss.folder),
                "rows": ss.num_rows,
                "id_offset": offset,
                "files": [{"name": s.path.name, "rows": s.num_rows, "text_rows": s.num_text_rows} for s in ss.shards],
            }
        )
        manifest.shards["rows"] = int(manifest.shards.get("rows", 0)) + ss.num_rows
        write_json_atomic(tmp / MANIFEST, manifest.to_dict())
        if (index_dir / "onnx").is_dir():  # the model's ONNX export (retriever.onnx): same model, still valid
            shutil.copytree(index_dir / "onnx", tmp / "onnx", copy_function=lambda s, d: _link(Path(s), Path(d)))
    return manifest


def indexed_ids(index_dir: Path, manifest: IndexManifest) -> np.ndarray:
    """Every id in the index (the image rows file has them all; text rows are a subset)."""
    entry = manifest.indexes.get("image") or next(iter(manifest.indexes.values()))
    reader = pa.ipc.open_file(pa.memory_map(str(index_dir / entry.rows_file), "r"))
    cols = [reader.get_batch(i).column("id").to_numpy() for i in range(reader.num_record_batches)]
    return np.concatenate(cols) if cols else np.zeros(0, np.int64)


def _id_offset(index_dir: Path, manifest: IndexManifest, ss: ShardSet, renumber: bool) -> int:
    old = indexed_ids(index_dir, manifest)
    new = np.concatenate([b.column("id").to_numpy() for _, b in ss.iter_batches(["id"])])
    if len(np.unique(new)) != len(new):
        raise UserError(f"{ss.folder} holds duplicate ids; each row needs its own id.")
    clash = np.isin(new, old)
    if not clash.any():
        return 0
    if not renumber:
        examples = ", ".join(str(i) for i in new[clash][:3])
        raise UserError(
            f"{int(clash.sum())} of the {len(new)} new rows have ids already in the index (e.g. {examples}); "
            f"pass --renumber to shift the new ids past the index's largest id ({int(old.max())})."
        )
    return int(old.max()) + 1 - int(new.min())


def _shift_ids(batches: Iterator[tuple[np.ndarray, pa.RecordBatch]], offset: int):
    for vectors, meta in batches:
        if offset:
            i = meta.schema.get_field_index("id")
            meta = meta.set_column(i, "id", pc.add(meta.column("id"), pa.scalar(offset, pa.int64())))
        yield vectors, meta


def _link(src: Path, dst: Path) -> None:
    """Hard-link an unchanged file into the new folder (copy where links are not possible)."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
