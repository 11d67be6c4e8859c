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
import glob
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retriever.atomic import atomic_dir, clean_stale_siblings, write_json_atomic
from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.indexes.build import BuildProgress, add_batches, row_bias
from retriever.indexes.files import check_index, open_rows, read_index_file
from retriever.indexes.manifest import MANIFEST, IndexManifest, read_index_manifest
from retriever.indexes.rows import HIDDEN_COLUMNS, file_schema
from retriever.indexes.settings import configure_faiss
from retriever.locks import folder_lock
from retriever.parts import missing_parts
from retriever.querybank import BANK_FILE, BIAS_COLUMN, read_querybank
from retriever.shards import ShardSet


def add_to_index(
    index_dir: str | Path,
    new_shards: str | Path | ShardSet,
    *,
    renumber: bool = False,
    batch_size: int = 16_384,
    progress: BuildProgress | None = None,
    wait: bool = False,
    on_message: Callable[[str], None] | None = None,
) -> IndexManifest:
    """Append the rows of `new_shards` to an existing index folder without retraining it.

    The folder is locked while it is rewritten (see retriever/locks.py); what killed writers left
    beside it is removed under the lock first.

    Args:
        index_dir: the index folder (`build_index`); rewritten atomically.
        new_shards: a shard folder (or `ShardSet`) made with the index's model.
        renumber: shift the new row ids past the index's largest id instead of refusing clashing ids.
        batch_size: vectors added per faiss call.
        progress: called with (modality, rows done, rows to do).
        wait: if another process is writing the index, wait for it instead of refusing.
        on_message: called with a sentence when waiting and for each leftover removed.

    Returns:
        The new `IndexManifest`.
    """
    configure_faiss()
    index_dir = Path(index_dir).expanduser()
    if not any(index_dir.parent.glob(f".{glob.escape(index_dir.name)}.*.old")):  # else: restored under the lock
        read_index_manifest(index_dir)  # refuse a non-index before creating a lock file beside it
    with folder_lock(index_dir, inside=False, wait=wait, on_wait=on_message):
        for line in clean_stale_siblings(index_dir):
            if on_message:
                on_message(line)
        # Read under the lock: a writer we waited for may have just replaced the index.
        return _add_locked(index_dir, new_shards, renumber, batch_size, progress)


def _add_locked(index_dir: Path, new_shards, renumber: bool, batch_size: int, progress) -> IndexManifest:
    manifest = read_index_manifest(index_dir)
    for entry in manifest.indexes.values():
        check_index(index_dir, entry)  # a damaged index is refused before anything is written
    ss = new_shards if isinstance(new_shards, ShardSet) else ShardSet(new_shards)
    missing_parts(ss.folder)
    ModelIdentity.from_dict(manifest.model).check_same(ss.identity, f"Shard folder {ss.folder}")
    if ss.count("text") and "text" not in manifest.indexes:
        raise UserError(
            f"{ss.folder} has captions but index {index_dir} has no text index to add them to; "
            "rebuild it with `retriever index` over all shards."
        )
    offset = _id_offset(index_dir, manifest, ss, renumber)
    bank = read_querybank(index_dir, manifest.model["weights_sha256"])
    with atomic_dir(index_dir) as tmp:
        if bank is not None:
            _link(index_dir / BANK_FILE, tmp / BANK_FILE)
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
            index = read_index_file(index_dir, old)
            old_ivf = index if old.ivfdata_file else None
            # Rows keep the index's columns: new shards' extra columns are dropped, missing ones null.
            schema = file_schema(index_dir / old.rows_file)
            wanted = [c for c in schema.names if c in ss.column_names and c not in HIDDEN_COLUMNS]
            if BIAS_COLUMN in schema.names and bank is None:
                raise UserError(
                    f"Index {index_dir} ranks with a querybank, but its {BANK_FILE} is missing or damaged; "
                    "rebuild it with `retriever index` over all shards."
                )
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
                bias=row_bias(bank, modality) if BIAS_COLUMN in schema.names else None,
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
    reader = open_rows(index_dir / entry.rows_file)
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
