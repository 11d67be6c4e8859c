"""IVF indexes bigger than RAM: built in blocks, merged into one on-disk `.ivfdata` file.

The recipe of faiss's `contrib/ondisk.py`: train once, add each block of vectors to a copy of the
trained (empty) index, write the block, then merge the blocks' inverted lists into an
`OnDiskInvertedLists` file that faiss memory-maps at search time. Differences from
`faiss.contrib.ondisk.merge_ondisk`: blocks may be in-memory indexes or already-merged on-disk
indexes (that is how `--add` extends one without rereading the old vectors), and the `.ivfdata`
file is found next to the index file (IO_FLAG_ONDISK_SAME_DIR), so the index folder can be
renamed into place atomically after it was built under a temporary name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import faiss


def open_on_disk(path: str | Path) -> faiss.Index:
    """Read an index whose inverted lists live in an .ivfdata file beside it.

    Not combined with IO_FLAG_MMAP: with faiss 1.15.1 that pair reads fine and then segfaults on
    the first search; the on-disk lists are memory-mapped by OnDiskInvertedLists anyway.
    """
    return faiss.read_index(str(path), faiss.IO_FLAG_ONDISK_SAME_DIR)


def read_block(path: str | Path) -> faiss.Index:
    """A written block, its lists memory-mapped rather than loaded (as merge_ondisk does)."""
    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)


def merge_on_disk(trained: faiss.Index, blocks: Sequence[faiss.Index], ivfdata: str | Path) -> faiss.Index:
    """Move the inverted lists of `blocks` (ids kept as they are) into `ivfdata`, attached to the
    empty `trained` index, which is returned."""
    ivf = faiss.extract_index_ivf(trained)
    if trained.ntotal != 0:
        raise ValueError("merge_on_disk needs an empty trained index")
    lists = [faiss.extract_index_ivf(b).invlists for b in blocks]
    ptrs = faiss.InvertedListsPtrVector()
    for inv in lists:
        ptrs.push_back(inv)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    ntotal = ondisk.merge_from_multiple(ptrs.data(), ptrs.size(), False) if len(lists) else 0
    trained.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()  # now owned by the index
    return trained


def is_on_disk(index: faiss.Index) -> bool:
    try:
        inv = faiss.extract_index_ivf(index).invlists
    except RuntimeError:
        return False
    return isinstance(faiss.downcast_InvertedLists(inv), faiss.OnDiskInvertedLists)
