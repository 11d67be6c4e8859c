"""Choose an index by memory budget: the first rung of the ladder whose estimate fits.

    flat → hnsw → ivf (IVF-Flat) → ivfpq/opq + RFlat re-ranking in RAM
         → ivfpq/opq + re-ranking from vectors on disk → the same with on-disk inverted lists

The budget bounds what retriever itself holds: the index while searching, and while building the
training sample (k-means runs before any vector is added) or the index plus a batch of vectors.
The Python interpreter with faiss and pyarrow loaded (~0.1 GB) is not counted, nor is the OS page
cache: re-ranking vectors are read with pread() into the page cache, not mapped (rerank.py).
Pages of faiss's own map of on-disk inverted lists do count in RSS while they stay mapped.
"""

from __future__ import annotations

import re
from dataclasses import replace

from retriever.errors import UserError
from retriever.indexes.choose import FLAT_MAX, HNSW_M, HNSW_MAX, OPQ_MIN, IndexSpec, choose_index, ivf_nlist, pq_shape

_UNITS = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
BATCH_ROWS = 16_384  # rows per streamed batch; its float32 copy plus Arrow's is counted


def parse_memory(text: str | int) -> int:
    """'4G', '512M', '1.5GB', '800MiB' or a byte count → bytes (binary units)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UserError(f"Cannot read memory size {text!r}; write it like 4G, 512M or 1.5GB.")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _ivf_parts(spec: IndexSpec, n: int, d: int) -> tuple[int, int, int]:
    """(nlist, bytes per stored code, fixed bytes of quantizer/codebooks/rotation)."""
    nlist = int(re.findall(r"IVF(\d+)", spec.factory)[0])
    fixed = 4 * nlist * d + 48 * nlist  # centroids + per-list vector headers
    if "_HNSW" in spec.factory:
        fixed += nlist * 8 * 32 * 2  # the quantizer's graph (2·M links on level 0)
    pq = re.search(r"PQ(\d+)x(\d+)", spec.factory)
    if pq is None:
        return nlist, 4 * d, fixed
    m, nbits = int(pq.group(1)), int(pq.group(2))
    fixed += 4 * d * 2**nbits  # PQ codebooks
    if spec.factory.startswith("OPQ"):
        fixed += 4 * d * d  # rotation matrix
    return nlist, (m * nbits + 7) // 8, fixed


def estimate_bytes(spec: IndexSpec, n: int, d: int) -> int:
    """RAM to hold the index for searching (memory-mapped files not counted)."""
    kind = spec.kind
    if kind == "flat":
        return 4 * n * d
    if kind == "hnsw":
        return int(n * (4 * d + 2 * HNSW_M * 4 * 1.06 + 16))
    _, code, fixed = _ivf_parts(spec, n, d)
    lists = 0 if spec.on_disk else n * (code + 8)  # codes + int64 ids
    refine = 4 * n * d if spec.factory.endswith(",RFlat") else 0
    return lists + refine + fixed


def estimate_build_bytes(spec: IndexSpec, n: int, d: int, batch_rows: int = BATCH_ROWS) -> int:
    """Peak RAM while building: the larger of the training phase and the adding phase."""
    batch = 3 * min(batch_rows, n) * 4 * d  # Arrow batch, float32 copy, faiss's internal copy
    train = 0
    if spec.train_size:
        nlist, _, fixed = _ivf_parts(spec, n, d)
        # Sample + assignment tables of k-means + the quantizer/codebooks being trained.
        train = spec.train_size * (4 * d + 16) + fixed
        if spec.factory.startswith("OPQ"):
            train += spec.train_size * 4 * d  # OPQ keeps a rotated copy of the sample
        if spec.kind in ("ivfpq", "opq"):
            train += spec.train_size * 4 * d  # IVF-PQ trains its PQ on a copy of residuals
    # faiss grows its code arrays by doubling (std::vector): a Flat or HNSW store briefly holds
    # old and new buffers (benchmarks/RESULTS.md, "Figures behind comments"); IVF lists grow one
    # list at a time but keep up to 2× capacity, ~1.5× on average.
    final = estimate_bytes(spec, n, d)
    growth = 2.0 if spec.kind in ("flat", "hnsw") else 1.5
    lists = 0 if spec.on_disk else n * (_ivf_parts(spec, n, d)[1] + 8) if spec.kind not in ("flat", "hnsw") else final
    if spec.factory.endswith(",RFlat"):
        lists += 4 * n * d  # the refine store grows the same way
    add = int(final + (growth - 1) * lists) + batch
    if spec.on_disk:
        add += block_rows(spec, n, d) * (_ivf_parts(spec, n, d)[1] + 8)
    return max(train, add)


def block_rows(spec: IndexSpec, n: int, d: int) -> int:
    """Rows per in-RAM IVF block before it is written out and merged on disk: an eighth of the
    lists (10M×PQ64 → 90 MB blocks), so the merge reads a handful of files."""
    return min(n, max(BATCH_ROWS, n // 8))


def candidates(n: int, d: int, index_type: str = "auto", flat_max: int = FLAT_MAX) -> list[IndexSpec]:
    """The rungs of the ladder allowed for this N and --index-type, in order of preference.

    Flat, HNSW and IVF-Flat all hold the full vectors, so under a budget they succeed or fail
    together within a few percent; the rungs below them are what a budget really selects. PQ with
    RFlat re-ranking holds the full vectors too (it is faster than IVF-Flat, not smaller), so it
    is offered only when asked for by --index-type; `auto` goes from IVF-Flat straight to PQ
    re-ranked from vectors on disk.
    """
    if index_type == "auto":
        pq_kind = "opq" if n >= OPQ_MIN else "ivfpq"
        out = [choose_index(n, d, "flat")] if n <= flat_max else []
        if n <= HNSW_MAX:
            out.append(choose_index(n, d, "hnsw"))
        return out + [
            choose_index(n, d, "ivf"),
            choose_index(n, d, pq_kind, rerank="mmap"),
            choose_index(n, d, pq_kind, rerank="mmap", on_disk=True),
            choose_index(n, d, "ivf", on_disk=True),
        ]
    if index_type in ("flat", "hnsw"):
        return [choose_index(n, d, index_type, flat_max)]
    if index_type == "ivf":
        return [choose_index(n, d, "ivf"), choose_index(n, d, "ivf", on_disk=True)]
    return [
        choose_index(n, d, index_type, rerank="rflat"),
        choose_index(n, d, index_type, rerank="mmap"),
        choose_index(n, d, index_type, rerank="mmap", on_disk=True),
    ]


def choose_for_budget(
    n: int, d: int, max_memory: int | None, index_type: str = "auto", flat_max: int = FLAT_MAX
) -> IndexSpec:
    """The first candidate whose search and build memory fit `max_memory` bytes (None: no limit)."""
    cands = candidates(n, d, index_type, flat_max)
    if max_memory is None:
        spec = cands[0]
        return replace(spec, memory_bytes=estimate_bytes(spec, n, d))
    best_need: tuple[int, IndexSpec] | None = None
    for spec in cands:
        spec = _fit_training(spec, n, d, max_memory)
        need = max(estimate_bytes(spec, n, d), estimate_build_bytes(spec, n, d))
        if need <= max_memory:
            return replace(spec, memory_bytes=estimate_bytes(spec, n, d))
        if best_need is None or need < best_need[0]:
            best_need = (need, spec)
    assert best_need is not None  # candidates() is never empty
    need, spec = best_need
    what = "any index" if index_type == "auto" else f"{'an' if index_type[0] in 'aeiou' else 'a'} {index_type} index"
    raise UserError(
        f"{format_bytes(max_memory)} is too little for {what} over {n:,} vectors of dim {d}: the smallest "
        f"({spec_label(spec)}) needs about {format_bytes(need)}; raise --max-memory."
    )


def _fit_training(spec: IndexSpec, n: int, d: int, budget: int) -> IndexSpec:
    """Shrink the training sample to what the budget allows, never below faiss's minimum."""
    if not spec.train_size:
        return spec
    nlist, _, fixed = _ivf_parts(spec, n, d)
    per = 4 * d + 16 + (4 * d if spec.factory.startswith("OPQ") else 0)
    minimum = min(n, max(39 * nlist, 1000))
    affordable = max(0, (budget - fixed) // per)
    return replace(spec, train_size=int(max(minimum, min(spec.train_size, affordable))))


def spec_label(spec: IndexSpec) -> str:
    extra = []
    if spec.rerank == "mmap":
        extra.append("re-ranked from vectors on disk")
    if spec.on_disk:
        extra.append("inverted lists on disk")
    return spec.factory + (f" ({', '.join(extra)})" if extra else "")


__all__ = [
    "block_rows",
    "candidates",
    "choose_for_budget",
    "spec_label",
    "estimate_build_bytes",
    "estimate_bytes",
    "format_bytes",
    "ivf_nlist",
    "parse_memory",
    "pq_shape",
]
