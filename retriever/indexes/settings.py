"""Process-wide faiss settings, applied by an explicit call where an index is built or opened.

Importing retriever changes nothing global; `build_index`, `add_to_index` and `Retriever` call
`configure_faiss()` (idempotent, cheap) before they touch an index.
"""

from __future__ import annotations

import faiss

# faiss switches from its sequential kernel to BLAS only when nq·d >= 128000 (faiss 1.15), which made
# a batch of 64 queries at d=512 several times slower on a 2-core CPU (benchmarks/RESULTS.md,
# "Figures behind comments"). BLAS is as fast as the sequential kernel even for one query.
BLAS_THRESHOLD = 1


def configure_faiss() -> None:
    """Set faiss's process-wide search settings that retriever relies on (BLAS for every batch size)."""
    faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
