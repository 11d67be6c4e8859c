"""Process-wide faiss settings, applied by an explicit call where an index is built or opened.

Importing retriever changes nothing global; `build_index`, `add_to_index` and `Retriever` call
`configure_faiss()` (idempotent, cheap) before they touch an index.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import faiss

# faiss switches from its sequential kernel to BLAS only when nq·d >= 128000 (faiss 1.15), which made
# a batch of 64 queries at d=512 several times slower on a 2-core CPU (benchmarks/RESULTS.md,
# "Figures behind comments"). BLAS is as fast as the sequential kernel even for one query.
BLAS_THRESHOLD = 1


def configure_faiss() -> None:
    """Set faiss's process-wide search settings that retriever relies on (BLAS for every batch size)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


# A search smaller than this (query count x vectors scanned x dimension, in multiply-adds) runs on
# the calling thread alone. Sharing it out costs more than it saves once the cores are busy: with
# another process or an encoder's threads on the second core, OpenMP's hand-off made one query over
# a 1,914-vector flat index take 80 ms instead of 0.3 ms (benchmarks/RESULTS.md, "Figures behind
# comments"). 50M multiply-adds are ~10 ms on one core.
SMALL_SEARCH_WORK = 50_000_000


def vectors_scanned(index: faiss.Index, k: int = 10) -> float:
    """About how many stored vectors one query for `k` results compares against (flat: all of them)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        return vectors_scanned(idx.index, k)
    if isinstance(idx, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        return vectors_scanned(idx.base_index, k) + idx.k_factor * k  # the re-ranked candidates
    if isinstance(idx, faiss.IndexIVF):
        return idx.nlist + idx.ntotal * min(idx.nprobe, idx.nlist) / max(1, idx.nlist)
    if isinstance(idx, faiss.IndexHNSW):
        return idx.hnsw.efSearch * 32
    return float(idx.ntotal)


@contextmanager
def search_threads(index: faiss.Index, n_queries: int, k: int = 10) -> Iterator[None]:
    """Run a faiss search on the calling thread alone when it is small (see SMALL_SEARCH_WORK).

    libgomp keeps the thread count per calling thread, so concurrent searches from other threads
    (a server's workers) keep their own setting.
    """
    if n_queries * vectors_scanned(index, k) * index.d >= SMALL_SEARCH_WORK:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)
