"""Exact re-ranking of approximate candidates from a memory-mapped copy of the vectors.

PQ codes rank neighbours coarsely (recall@10 ≈ 0.74 on 512-d data); re-scoring the top k·factor
candidates with exact inner products restores it. faiss's RFlat does this with the vectors in RAM;
when RAM is short the float32 vectors live in `.npy` files in the index folder and only the rows
asked for are paged in. Several files (one per `--add`) form one store in row order.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Sequence

import faiss
import numpy as np

# Search parameters that retriever applies itself; faiss's ParameterSpace must not see them.
OWN_PARAMS = ("rerank_k_factor",)


class VectorStore:
    """Row-ordered float32 vectors from one or more memory-mapped .npy segments."""

    def __init__(self, paths: Sequence[str | Path]):
        self.parts = [np.load(str(p), mmap_mode="r") for p in paths]
        for part in self.parts:
            # Rows are fetched at random: without this, each fault reads ahead 128 KiB and the
            # whole file ends up resident (and counted in RSS) after a few thousand queries.
            mm = getattr(part, "_mmap", None)
            if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
                mm.madvise(mmap.MADV_RANDOM)
        self.offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.d = self.parts[0].shape[1] if self.parts else 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Vectors of `rows` (any shape of int64); rows < 0 give zero vectors."""
        flat = np.asarray(rows, np.int64).ravel()
        out = np.zeros((len(flat), self.d), np.float32)
        valid = flat >= 0
        seg = np.searchsorted(self.offsets, flat, side="right") - 1
        for s in np.unique(seg[valid]):
            m = valid & (seg == s)
            local = flat[m] - self.offsets[s]
            order = np.argsort(local)  # sorted reads walk the file forwards
            out[np.flatnonzero(m)[order]] = self.parts[s][local[order]]
        return out.reshape(*np.shape(rows), self.d)


class VectorWriter:
    """Streams vectors into a .npy file whose row count is known before the build starts.

    Plain file writes, not a writable memmap: dirty pages of a shared mapping count in the
    process's RSS (a 1M×512 build peaked 2 GB higher that way), page-cache pages do not.
    """

    def __init__(self, path: str | Path, count: int, dim: int):
        self.path = Path(path)
        self.count, self.dim = count, dim
        self.file = open(self.path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (count, dim)}
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
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < candidates.shape[1] else np.tile(np.arange(k), (len(scores), 1))
    s = np.take_along_axis(scores, top, 1)
    order = np.argsort(-s, axis=1, kind="stable")
    top = np.take_along_axis(top, order, 1)
    rows = np.take_along_axis(candidates, top, 1)
    s = np.take_along_axis(scores, top, 1)
    s[rows < 0] = -np.inf  # faiss's convention for missing results is row -1 (score -inf for IP)
    return s.astype(np.float32), rows


def search_index(
    index: faiss.Index, queries: np.ndarray, k: int, params: dict | None = None, store: VectorStore | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """faiss search, then exact re-ranking when the index keeps its vectors in a VectorStore."""
    k = min(k, index.ntotal)
    factor = int((params or {}).get("rerank_k_factor", 0))
    if store is None or factor < 1:
        return index.search(queries, k)
    kk = min(index.ntotal, k * max(1, factor))
    # Re-rank in chunks: the gathered candidates cost nq·kk·d·4 bytes.
    chunk = max(1, (64 << 20) // max(1, kk * store.d * 4))
    out_s, out_r = [], []
    for lo in range(0, len(queries), chunk):
        q = queries[lo : lo + chunk]
        _, cand = index.search(q, kk)
        s, r = rerank(store, q, cand, k)
        out_s.append(s)
        out_r.append(r)
    return np.concatenate(out_s), np.concatenate(out_r)
