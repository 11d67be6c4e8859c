"""Which FAISS index to build for N vectors of dimension d, and how to search it.

Without a memory budget: exact inner-product search while it is cheap, graph (HNSW) search for the
middle range, inverted lists (IVF) above. With a budget, `select.choose_for_budget` walks the same
ladder down to compressed (PQ) codes until the index fits. Cluster counts follow the faiss wiki's
guidelines (nlist ≈ 4·√N…16·√N, 30–256 training points per centroid).

Index kinds, from most to least memory per vector (d = 512):

    flat     Flat                                  4·d bytes, exact
    hnsw     HNSW32,Flat                           4·d + ~270 bytes
    ivf      IVF{nlist},Flat                       4·d + 8 bytes
    ivfpq    IVF{nlist},PQ{M}np (+ re-ranking)     M + 8 bytes (+ 4·d with RFlat in RAM)
    opq      OPQ{M}_{d},IVF{nlist}_HNSW32,PQ{M}np  M + 8 bytes; for N in the millions

PQ is always built with `np` (no polysemous training): plain `PQ64` makes faiss train a
polysemous ordering too, which cost 80–175 s on 200k vectors and is useless for our search.
PQ codes alone lose recall (recall@10 0.74 on 512-d data), so PQ kinds re-rank with exact
inner products: `RFlat` (vectors in RAM, faiss's IndexRefineFlat) or, when RAM is short, from a
memory-mapped float32 copy of the vectors in the index folder (`rerank="mmap"`, see rerank.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from retriever.errors import UserError

FLAT_MAX = 100_000  # below this, exact search of one query costs < ~15 ms at d=512 on 2 cores
HNSW_MAX = 2_000_000
OPQ_MIN = 2_000_000  # from here the IVF quantizer itself is searched with HNSW (faiss guideline)
INDEX_TYPES = ("auto", "flat", "hnsw", "ivf", "ivfpq", "opq")
HNSW_M = 32
# The faiss guideline is 30–256 training points per centroid; 40 (above faiss's 39-point warning)
# keeps k-means for 1M vectors (4096 centroids) at about a minute on 2 cores.
TRAIN_PER_CENTROID = 40
PQ_TRAIN_MIN = 256 * 40  # 8-bit PQ: 256 centroids per sub-quantizer


@dataclass(frozen=True)
class IndexSpec:
    factory: str  # faiss index_factory string (metric: inner product)
    search_params: dict = field(default_factory=dict)  # faiss ParameterSpace names → values
    train_size: int = 0  # training vectors to sample; 0 = no training
    rerank: str = ""  # "" (none or faiss RFlat inside the factory) | "mmap": exact, from disk
    on_disk: bool = False  # inverted lists merged into an .ivfdata file, memory-mapped to search
    memory_bytes: int = 0  # estimated RAM to search (select.estimate_bytes)

    @property
    def kind(self) -> str:
        return kind_of(self.factory)


def kind_of(factory: str) -> str:
    if factory == "Flat":
        return "flat"
    if factory.startswith("HNSW"):
        return "hnsw"
    if factory.startswith("OPQ"):
        return "opq"
    return "ivfpq" if ",PQ" in factory else "ivf"


def choose_index(
    n: int, d: int, index_type: str = "auto", flat_max: int = FLAT_MAX, *, rerank: str = "rflat", on_disk: bool = False
) -> IndexSpec:
    """The index for n vectors of dim d, ignoring memory (see select.choose_for_budget for that).

    `rerank` applies to PQ kinds: "rflat" (exact vectors in RAM) or "mmap" (exact, from disk).
    """
    if index_type not in INDEX_TYPES:
        raise UserError(f"Unknown index type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}.")
    if n < 1:
        raise UserError("There are no vectors to index.")
    if index_type == "auto":
        index_type = "flat" if n <= flat_max else "hnsw" if n <= HNSW_MAX else "opq"
    if index_type == "flat":
        return IndexSpec("Flat")
    if index_type == "hnsw":
        return IndexSpec(f"HNSW{HNSW_M},Flat", {"efSearch": 64})
    nlist = ivf_nlist(n)
    train = min(n, max(TRAIN_PER_CENTROID * nlist, 1000))
    nprobe = max(1, min(nlist, 32))
    if index_type == "ivf":
        return IndexSpec(f"IVF{nlist},Flat", {"nprobe": nprobe}, train_size=train, on_disk=on_disk)
    m, nbits = pq_shape(d, min(n, max(train, PQ_TRAIN_MIN)))
    pq = f"PQ{m}x{nbits}np"
    if index_type == "ivfpq":
        factory = f"IVF{nlist},{pq}"
        params = {"nprobe": nprobe}
    else:
        factory = f"OPQ{m}_{d},IVF{nlist}_HNSW32,{pq}"
        params = {"nprobe": nprobe, "quantizer_efSearch": max(64, 2 * nprobe)}
    train = min(n, max(train, PQ_TRAIN_MIN))
    if rerank == "rflat" and not on_disk:
        return IndexSpec(factory + ",RFlat", {**params, "k_factor_rf": 4}, train_size=train)
    if rerank not in ("rflat", "mmap"):
        raise ValueError(f"rerank must be rflat or mmap, not {rerank!r}")
    # On-disk lists cannot sit under faiss's RFlat wrapper, so they re-rank from the vectors on disk.
    return IndexSpec(factory, {**params, "rerank_k_factor": 4}, train_size=train, rerank="mmap", on_disk=on_disk)


def ivf_nlist(n: int) -> int:
    """≈ 4·√N (the faiss guideline's low end, cheap k-means on few cores) as a power of two,
    keeping ≥ 39 points per centroid."""
    nlist = 2 ** round(math.log2(max(1.0, 4 * math.sqrt(n))))
    return int(max(1, min(nlist, n // 39 or 1)))


def pq_shape(d: int, n_train: int) -> tuple[int, int]:
    """(M sub-quantizers, bits each): 8 dims per sub-quantizer (M=64 at d=512), M dividing d;
    fewer than 8 bits when the training sample cannot support 256 centroids."""
    m = next((m for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if d % m == 0 and d // m >= 4), 1)
    nbits = int(max(1, min(8, math.floor(math.log2(max(2, n_train // 39))))))
    return m, nbits
