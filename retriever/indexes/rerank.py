"""Exact re-ranking of approximate candidates from an on-disk copy of the vectors.

PQ codes rank neighbours coarsely (recall@10 ≈ 0.74 on 512-d data); re-scoring the top k·factor
candidates with exact inner products restores it. faiss's RFlat does this with the vectors in RAM;
when RAM is short the float32 vectors live in `.npy` files in the index folder and only the rows
asked for are read. Several files (one per `--add`) form one store in row order.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from retriever.errors import UserError
from retriever.indexes.settings import search_threads

# Search parameters that retriever applies itself; faiss's ParameterSpace must not see them.
OWN_PARAMS = ("rerank_k_factor",)


def _read_into(fd: int, dst: memoryview, offset: int) -> int:
    """pread straight into `dst` (os.preadv: Linux, BSD, macOS), or through a bytes copy."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [dst], offset)
    data = os.pread(fd, len(dst), offset)
    dst[: len(data)] = data
    return len(data)


class VectorStore:
    """Row-ordered float32 vectors from one or more .npy segments, read row by row with pread().

    Not a memory map: this store is the rung of the ladder for when RAM is short, and on Linux
    pages of a mapped file count in the process's RSS — with large page-cache folios one random
    row mapped megabytes (fetching 200 rows of a freshly written 2 GB file made 459 MiB resident,
    320k rows all 2 GB, and MADV_RANDOM / MADV_DONTNEED could not bound it cheaply). pread() leaves
    the data in the page cache, where the kernel reclaims it freely, and costs 2.5 µs a row
    against 1.3 µs through a map (20k random rows of 1M×512: 49 ms against 26 ms).
    """

    def __init__(self, paths: Sequence[str | Path]):
        self.files, self.header_bytes, lengths = [], [], []
        self.d = 0
        for p in paths:
            f = open(p, "rb")
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if fortran or dtype != np.float32 or len(shape) != 2:
                f.close()
                raise ValueError(f"{p}: expected a C-ordered float32 matrix, found {dtype} {shape}")
            self.files.append(f)
            self.header_bytes.append(f.tell())
            lengths.append(shape[0])
            self.d = shape[1]
        self.offsets = np.cumsum([0] + lengths)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of `rows` (any shape of int64); rows < 0 give zero vectors."""
        flat = np.asarray(rows, np.int64).ravel()
        out = np.zeros((len(flat), self.d), np.float32)
        buf = out.data.cast("B")
        row_bytes = 4 * self.d
        positions = np.flatnonzero(flat >= 0)
        positions = positions[np.argsort(flat[positions], kind="stable")]  # sorted reads walk the file forwards
        wanted = flat[positions]
        seg = np.searchsorted(self.offsets, wanted, side="right") - 1
        if len(wanted) and wanted[-1] >= len(self):
            raise IndexError(f"row {int(wanted[-1])} is beyond the {len(self)} stored vectors")
        starts = (wanted - self.offsets[seg]) * row_bytes + np.asarray(self.header_bytes, np.int64)[seg]
        fds = [f.fileno() for f in self.files]
        for pos, s, start in zip(positions.tolist(), seg.tolist(), starts.tolist()):
            dst = buf[pos * row_bytes : (pos + 1) * row_bytes]
            if _read_into(fds[s], dst, start) != row_bytes:
                raise OSError(f"{self.files[s].name}: short read at byte {start}")
        return out.reshape(*np.shape(rows), self.d)

    def close(self) -> None:
        for f in self.files:
            f.close()


class VectorWriter:
    """Streams vectors into a .npy file whose row count is known before the build starts.

    Plain file writes, not a writable memmap: dirty pages of a shared mapping count in the
    process's RSS (a 1M×512 build peaked 2 GB higher that way), page-cache pages do not.
    """

    def __init__(self, path: str | Path, count: int, dim: int):
        self.path = Path(path)
        self.count, self.dim = count, dim
        self.file = open(self.path, "wb")
        header = {
            "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
            "fortran_order": False,
            "shape": (count, dim),
        }
        np.lib.format.write_array_header_1_0(self.file, header)
        self.pos = 0

    def write(self, vectors: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(vectors, np.float32).tobytes())
        self.pos += len(vectors)

    def close(self) -> None:
        self.file.close()
        if self.pos != self.count:
            raise RuntimeError(f"{self.path.name}: wrote {self.pos} of {self.count} vectors")


def rerank(store: VectorStore, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, rows) of the best k among each query's candidate rows (-1 = none)."""
    vecs = store.take(candidates)  # (nq, kk, d)
    scores = np.einsum("qkd,qd->qk", vecs, queries, optimize=True)
    scores[candidates < 0] = -np.inf
    k = min(k, candidates.shape[1])
    top = (
        np.argpartition(-scores, k - 1, axis=1)[:, :k]
        if k < candidates.shape[1]
        else np.tile(np.arange(k), (len(scores), 1))
    )
    s = np.take_along_axis(scores, top, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    rows = np.take_along_axis(candidates, top, 1)
    s = np.take_along_axis(scores, top, 1)
    s[rows < 0] = -np.inf  # faiss's convention for missing results is row -1 (score -inf for IP)
    return s.astype(np.float32), rows


def search_index(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    params: dict | None = None,
    store: VectorStore | None = None,
    *,
    max_k: int | None = None,
    faiss_params: faiss.SearchParameters | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """faiss search, then exact re-ranking when the index keeps its vectors in a VectorStore.

    max_k: the most results faiss can return per search of this index (2048 on a GPU, see
    gpu.max_k). A k above it is refused; re-ranking candidates (RFlat's k·k_factor_rf, or
    k·rerank_k_factor from disk) are capped to it, which can only lower recall a little.
    faiss_params: per-call faiss SearchParameters (e.g. a larger nprobe for post-filtering).
    """
    k = min(k, index.ntotal)
    if max_k is not None and k > max_k:
        raise UserError(
            f"k={k} is more than the {max_k} results faiss returns from a GPU index; "
            "ask for fewer or search on the CPU (use_gpu=False, --no-gpu)."
        )
    factor = int((params or {}).get("rerank_k_factor", 0))
    if store is None or factor < 1:
        return _search(index, queries, k, max_k, faiss_params)
    kk = min(index.ntotal, k * max(1, factor), max_k or index.ntotal)
    # Re-rank in chunks: the gathered candidates cost nq·kk·d·4 bytes.
    chunk = max(1, (64 << 20) // max(1, kk * store.d * 4))
    out_s, out_r = [], []
    for lo in range(0, len(queries), chunk):
        q = queries[lo : lo + chunk]
        _, cand = _search(index, q, kk, max_k, faiss_params)
        s, r = rerank(store, q, cand, k)
        out_s.append(s)
        out_r.append(r)
    return np.concatenate(out_s), np.concatenate(out_r)


def capped_refine_factor(k: int, k_factor: float, max_k: int | None) -> float:
    """RFlat's k_factor so that its base index is asked for at most max_k candidates."""
    if max_k is None or k * k_factor <= max_k:
        return k_factor
    return max(1.0, math.floor(max_k / k * 1000) / 1000)


def _search(index: faiss.Index, queries: np.ndarray, k: int, max_k: int | None, faiss_params=None):
    """index.search (one thread when the search is small), keeping an RFlat base within max_k results."""
    with search_threads(index, len(queries), k):
        return _search_capped(index, queries, k, max_k, faiss_params)


def _search_capped(index: faiss.Index, queries: np.ndarray, k: int, max_k: int | None, faiss_params=None):
    if faiss_params is not None:  # per-call parameters (CPU only: open.more_effort gives none on a GPU)
        return index.search(queries, k, params=faiss_params)
    outer = faiss.downcast_index(index)
    if max_k is not None and isinstance(outer, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        factor = capped_refine_factor(k, outer.k_factor, max_k)
        if factor != outer.k_factor:
            params = faiss.IndexRefineSearchParameters()
            params.k_factor = factor
            return index.search(queries, k, params=params)
    return index.search(queries, k)
