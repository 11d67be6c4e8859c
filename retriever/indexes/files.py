"""Open an index folder's files, turning a damaged file into one sentence instead of a traceback.

A truncated or overwritten `.faiss`, rows file or vectors segment makes faiss raise RuntimeError
and Arrow raise ArrowInvalid deep inside a search or an `--add`; users saw a C++ stack. Every
reader of an index goes through these functions.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import pyarrow as pa

from retriever.errors import UserError
from retriever.indexes.manifest import ModalityIndex


def damaged(path: Path, error: BaseException, advice: str | None = None) -> UserError:
    """The one sentence for an unreadable file; `advice` says how to recover (default: rebuild the index)."""
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    if advice is None:
        advice = f"the index is damaged, rebuild it with `retriever index SHARDS --out {path.parent}`"
    return UserError(f"Index file {path} cannot be read ({reason}); {advice}.")


def read_faiss(path: Path, flags: int = 0, advice: str | None = None) -> faiss.Index:
    """A faiss index file; with IO_FLAG_ONDISK_SAME_DIR its `.ivfdata` is checked to be whole."""
    if not path.is_file():
        raise damaged(path, FileNotFoundError("missing"), advice)
    try:
        index = faiss.read_index(str(path), flags)
    except (RuntimeError, MemoryError, OSError) as e:  # faiss raises RuntimeError for any bad file
        raise damaged(path, e, advice) from None
    if flags & faiss.IO_FLAG_ONDISK_SAME_DIR:
        check_on_disk_lists(index, advice)
    return index


def check_on_disk_lists(index: faiss.Index, advice: str | None = None) -> None:
    """Refuse an on-disk IVF whose `.ivfdata` is shorter than its lists say.

    faiss memory-maps the file without checking its size, so a truncated one is not an error but a
    SIGBUS (the process dies, no message) at the first search or merge that touches a missing page.
    """
    try:
        inv = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    except RuntimeError:  # not an IVF index
        return
    if not isinstance(inv, faiss.OnDiskInvertedLists):
        return
    data = Path(inv.filename)
    size = data.stat().st_size if data.is_file() else 0
    if size < inv.totsize:
        raise damaged(data, ValueError(f"it holds {size} bytes, its index needs {inv.totsize}"), advice)


def read_index_file(folder: Path, entry: ModalityIndex) -> faiss.Index:
    """The modality's faiss index, its count checked against the manifest."""
    path = folder / entry.file
    index = read_faiss(path, faiss.IO_FLAG_ONDISK_SAME_DIR if entry.ivfdata_file else 0)
    if index.ntotal != entry.count or index.d != entry.dim:
        raise damaged(
            path, ValueError(f"it holds {index.ntotal}×{index.d}, the manifest says {entry.count}×{entry.dim}")
        )
    return index


def open_rows(path: Path, expected: int | None = None, advice: str | None = None) -> pa.ipc.RecordBatchFileReader:
    """The rows file's reader (memory-mapped), its row count checked when `expected` is given."""
    if not path.is_file():
        raise damaged(path, FileNotFoundError("missing"), advice)
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError) as e:
        raise damaged(path, e, advice) from None
    if expected is not None and rows != expected:
        raise damaged(path, ValueError(f"it holds {rows} rows, the manifest says {expected}"), advice)
    return reader


def check_index(folder: Path, entry: ModalityIndex, deep: bool = False) -> None:
    """Raise the damaged-file sentence unless every file of `entry` is present and opens.

    Cheap by default (file presence, the rows file's footer, the faiss header through a memory
    map); `deep` reads the whole faiss index as a search would.
    """
    names = [entry.file, entry.rows_file, *entry.vectors_files, entry.ivfdata_file, entry.trained_file]
    for name in filter(None, names):
        if not (folder / name).is_file():
            raise damaged(folder / name, FileNotFoundError("missing"))
    open_rows(folder / entry.rows_file, entry.count)
    if deep or entry.ivfdata_file:
        index = read_index_file(folder, entry)
    else:
        index = read_faiss(folder / entry.file, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        if index.ntotal != entry.count:
            raise damaged(
                folder / entry.file, ValueError(f"it holds {index.ntotal} vectors, the manifest says {entry.count}")
            )
    del index
