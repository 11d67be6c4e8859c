"""One modality of an index folder opened for search: the faiss index with its search parameters,
its re-rank store, its rows file, and the three ways to search it (plain, pre-filtered with a faiss
ID selector, post-filtered with adaptive over-fetch).

Filtered search returns the k best matching rows whenever at least k match:

- gathered pre-filter: when few rows match (≤ 20k, or < 2%, and < 64 MiB of vectors), their vectors are
  gathered once per filter into an exact flat index, searched at matches·d per query;
- pre-filter: a faiss `IDSelectorBitmap` restricts an exhaustive scan to the matching rows, on the
  index's exact vectors where it has them (Flat, HNSW storage, RFlat refine index) or over every
  inverted list (IVF kinds: nprobe = nlist, codes of non-matching rows are skipped, PQ re-ranked
  exactly from the store). Its cost is one bit test per row plus the matching rows' distances, so
  it is chosen when few rows match;
- post-filter: the unfiltered index is asked for k/selectivity·2 candidates, non-matching ones are
  dropped, and the request doubles until k remain or the index is exhausted. Chosen when many match.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retriever.errors import UserError
from retriever.indexes import gpu
from retriever.indexes.files import damaged, read_index_file
from retriever.indexes.manifest import ModalityIndex
from retriever.indexes.rerank import OWN_PARAMS, VectorStore, rerank, search_index
from retriever.indexes.rows import RowsFile
from retriever.querybank import BIAS_COLUMN

# Below this fraction of matching rows the pre-filter's exhaustive scan of the matches beats
# over-fetching k/selectivity candidates from the approximate index (see benchmarks/RESULTS.md).
PREFILTER_BELOW = 0.02
# The matching rows' vectors are gathered once per filter into an exact flat index when they are
# few (GATHER_ROWS, or any selective filter) and small (GATHER_BYTES): a query then costs
# matches·d, not a pass over every row's selector bit (82 ms at 0.1% of 1M on IVF, against 2 ms
# unfiltered). 50k gathered rows (5% of 1M) cost more than post-filtering (RESULTS.md).
GATHER_ROWS = 20_000
GATHER_BYTES = 64 << 20
OVERFETCH = 2.0  # post-filter asks for OVERFETCH·k/selectivity candidates, then doubles
POSTFILTER_EFFORT_MAX = 4.0  # at most 4× the tuned nprobe / efSearch for post-filtering


@dataclass
class RowFilter:
    """The rows a filter lets through, and (lazily) their vectors gathered into a flat index."""

    mask: np.ndarray  # bool per faiss row
    rows: np.ndarray = None  # type: ignore[assignment]  # faiss rows where mask is True
    gathered: faiss.IndexFlatIP | None = None
    bias_max: float | None = None  # the largest querybank bias among the rows (OpenIndex sets it)

    def __post_init__(self):
        self.mask = np.asarray(self.mask, bool)
        self.rows = np.flatnonzero(self.mask)

    @property
    def matching(self) -> int:
        return len(self.rows)


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply faiss ParameterSpace settings (nprobe, efSearch, …); retriever's own keys are skipped."""
    params = {k: v for k, v in (params or {}).items() if k not in OWN_PARAMS}
    if not params:
        return
    on_gpu = gpu.device_name(index) == "gpu"
    if on_gpu:  # a CPU coarse quantizer's parameters were set before the index moved (gpu.py)
        params = gpu.gpu_search_params(params)
        if not params:
            return
    desc = ",".join(f"{k}={v}" for k, v in params.items())
    space = faiss.GpuParameterSpace() if on_gpu else faiss.ParameterSpace()
    space.set_index_parameters(index, desc)


def open_index(index_dir: Path, entry: ModalityIndex, use_gpu: bool | None = None) -> faiss.Index:
    """The faiss index of `entry`, on the GPU when allowed and possible, search parameters set.

    use_gpu: None moves it to the GPU(s) when faiss has GPU support and it fits; True insists
    (a sentence if it cannot); False keeps it on the CPU.
    """
    # On-disk inverted lists are memory-mapped from the .ivfdata file beside the index.
    index = read_index_file(index_dir, entry)  # a damaged file is one sentence, not a C++ stack
    set_search_params(index, entry.search_params)  # before moving: the GPU clone keeps them
    if use_gpu is not False and not entry.ivfdata_file:
        n_gpus = gpu.gpu_count()
        # Free GPU memory is read through torch: only ask when there is a GPU, so that a CPU
        # vector search never imports torch.
        plan = gpu.gpu_plan(index, n_gpus, gpu_free_bytes=gpu._gpu_free_bytes() if n_gpus else None)
        if use_gpu and not plan.ok:
            raise UserError(f"use_gpu was asked for, but the {entry.modality} index cannot go to a GPU: {plan.reason}.")
        if plan.ok:
            index = gpu.to_gpu(index, plan)
            set_search_params(index, entry.search_params)
    return index


@dataclass
class Candidates:
    scores: np.ndarray  # (nq, kk) float32, best first; -inf where rows is -1
    rows: np.ndarray  # (nq, kk) int64 faiss rows
    strategy: str  # "none" | "prefilter" | "postfilter"
    exhausted: bool  # True when no further rows could be returned by asking for more


class OpenIndex:
    """One modality's index, re-rank store and rows file; `close()` releases the files."""

    def __init__(self, index_dir: Path, entry: ModalityIndex, use_gpu: bool | None = None):
        self.entry = entry
        self.index = open_index(index_dir, entry, use_gpu)
        files = [index_dir / f for f in entry.vectors_files] if entry.rerank == "mmap" else []
        self.store = VectorStore(files) if files else None
        self.rows = RowsFile(index_dir / entry.rows_file)
        if self.rows.num_rows != entry.count:
            raise damaged(
                self.rows.path, ValueError(f"it holds {self.rows.num_rows} rows, the manifest says {entry.count}")
            )
        self._direct_map = False
        self._bias: np.ndarray | None = None
        self._bias_max: float | None = None
        self.has_querybank = BIAS_COLUMN in self.rows.schema.names

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def d(self) -> int:
        return int(self.index.d)

    def search(self, queries: np.ndarray, k: int, effort: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Unfiltered search; `effort` > 1 scales nprobe / efSearch for this call only."""
        params = more_effort(self.index, effort) if effort > 1 else None
        return search_index(
            self.index,
            queries,
            k,
            self.entry.search_params,
            self.store,
            max_k=gpu.max_k(self.index),
            faiss_params=params,
        )

    def candidates(self, queries: np.ndarray, k: int, flt: RowFilter | None = None) -> Candidates:
        """The k best rows per query, among the filter's rows if a filter is given.

        Strategies: "prefilter-gathered" (few matches: exact search over their gathered vectors),
        "prefilter" (selective: faiss IDSelectorBitmap scan), "postfilter" (adaptive over-fetch).
        """
        k = min(k, self.ntotal)
        if flt is None:
            s, r = self.search(queries, k)
            return Candidates(s, r, "none", k >= self.ntotal)
        matching = flt.matching
        if matching == 0:
            empty = np.zeros((len(queries), 0))
            return Candidates(empty.astype(np.float32), empty.astype(np.int64), "prefilter", True)
        kk = min(k, matching)
        share = matching / self.ntotal
        small = matching * self.d * 4 <= GATHER_BYTES
        if small and (matching <= GATHER_ROWS or share < PREFILTER_BELOW):
            s, r = self.gathered(queries, kk, flt)
            return Candidates(s, r, "prefilter-gathered", k >= matching)
        if share < PREFILTER_BELOW or kind(self.index) == "flat":
            s, r = self.prefilter(queries, kk, flt.mask)
            return Candidates(s, r, "prefilter", k >= matching)
        s, r = self.postfilter(queries, kk, flt.mask, matching)
        return Candidates(s, r, "postfilter", k >= matching)

    def gathered(self, queries: np.ndarray, k: int, flt: RowFilter) -> tuple[np.ndarray, np.ndarray]:
        """Exact search over the filter's rows, their vectors gathered once and kept with the filter."""
        if flt.gathered is None:
            flat = faiss.IndexFlatIP(self.d)
            for lo in range(0, flt.matching, 65536):
                flat.add(np.ascontiguousarray(self.vectors(flt.rows[lo : lo + 65536]), np.float32))
            flt.gathered = flat
        s, pos = flt.gathered.search(queries, k)
        return s, np.where(pos >= 0, flt.rows[np.maximum(pos, 0)], -1)

    def prefilter(self, queries: np.ndarray, k: int, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exhaustive search restricted to `mask`'s rows with a faiss IDSelectorBitmap."""
        bits = np.packbits(mask.astype(bool), bitorder="little")
        sel = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits))
        index = gpu.to_cpu(self.index) if gpu.device_name(self.index) == "gpu" else self.index
        flat = exact_storage(index)
        if flat is not None:
            return flat.search(queries, k, params=faiss.SearchParameters(sel=sel))
        ivf = faiss.extract_index_ivf(index)
        ivf_params = faiss.SearchParametersIVF(sel=sel, nprobe=ivf.nlist, max_codes=0)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            ivf_params.quantizer_params = faiss.SearchParametersHNSW(efSearch=max(ivf.nlist, 16))
        outer = faiss.downcast_index(index)
        params = (
            faiss.SearchParametersPreTransform(index_params=ivf_params)
            if isinstance(outer, faiss.IndexPreTransform)
            else ivf_params
        )
        factor = int(self.entry.search_params.get("rerank_k_factor", 0))
        if self.store is not None and factor >= 1:
            kk = min(int(mask.sum()), k * factor)
            _, cand = index.search(queries, kk, params=params)
            return rerank(self.store, queries, cand, k)
        return index.search(queries, k, params=params)

    def postfilter(self, queries: np.ndarray, k: int, mask: np.ndarray, matching: int) -> tuple[np.ndarray, np.ndarray]:
        """Over-fetch from the unfiltered index, keep matching rows; double until k remain per query."""
        nq = len(queries)
        out_s = np.full((nq, k), -np.inf, np.float32)
        out_r = np.full((nq, k), -1, np.int64)
        todo = np.arange(nq)
        fetch = min(self.ntotal, int(np.ceil(OVERFETCH * k * self.ntotal / matching)))
        # The k best matches sit up to k/selectivity deep in the unfiltered ranking, where an
        # approximate index's recall is lower than at k: search harder in proportion.
        effort = min(POSTFILTER_EFFORT_MAX, self.ntotal / matching)
        while len(todo):
            s, r = self.search(queries[todo], fetch, effort)
            ok = (r >= 0) & mask[np.maximum(r, 0)]
            done = []
            for j, qi in enumerate(todo.tolist()):
                keep = np.flatnonzero(ok[j])[:k]
                if len(keep) >= k or fetch >= self.ntotal:
                    out_s[qi, : len(keep)] = s[j, keep]
                    out_r[qi, : len(keep)] = r[j, keep]
                    done.append(j)
            todo = np.delete(todo, done)
            fetch = min(self.ntotal, fetch * 2)
        return out_s, out_r

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Unit vectors of faiss rows: from the re-rank store, or reconstructed by faiss (exact for
        Flat, HNSW and RFlat; PQ codes decoded otherwise), renormalised."""
        rows = np.asarray(rows, np.int64)
        if self.store is not None:
            v = self.store.take(rows)
        else:
            index = gpu.to_cpu(self.index) if gpu.device_name(self.index) == "gpu" else self.index
            if not self._direct_map:
                try:
                    faiss.extract_index_ivf(index).make_direct_map()
                except RuntimeError:
                    pass  # not an IVF index: it reconstructs without a direct map
                self._direct_map = True
            v = index.reconstruct_batch(rows.ravel()).reshape(*rows.shape, self.d)
        norms = np.linalg.norm(v, axis=-1, keepdims=True)
        return v / np.maximum(norms, 1e-12)

    def querybank_bias(self, rows: np.ndarray) -> np.ndarray:
        """The querybank bias of faiss rows (`retriever.querybank`), read once per open index."""
        return self._biases()[np.asarray(rows, np.int64)]

    def querybank_bias_max(self, flt: RowFilter | None = None) -> float:
        """The largest bias of any row (of the filter's rows): how far a row not yet fetched could
        climb. Computed once per index and once per filter (filters are cached with their rows)."""
        if flt is None:
            if self._bias_max is None:
                b = self._biases()
                self._bias_max = float(b.max()) if len(b) else 0.0
            return self._bias_max
        if flt.bias_max is None:
            flt.bias_max = float(self.querybank_bias(flt.rows).max()) if flt.matching else 0.0
        return flt.bias_max

    def _biases(self) -> np.ndarray:
        if self._bias is None:
            self._bias = self.rows.float_column(BIAS_COLUMN)
        return self._bias

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        self.rows.close()
        self.index = None


def kind(index: faiss.Index) -> str:
    return "flat" if isinstance(faiss.downcast_index(index), faiss.IndexFlat) else "other"


def exact_storage(index: faiss.Index) -> faiss.IndexFlat | None:
    """The exact vectors of a Flat, HNSW-Flat or RFlat index as an IndexFlat; None for IVF kinds."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexFlat):
        return inner
    if isinstance(inner, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        refine = faiss.downcast_index(inner.refine_index)
        return refine if isinstance(refine, faiss.IndexFlat) else None
    if isinstance(inner, faiss.IndexHNSW):
        storage = faiss.downcast_index(inner.storage)
        return storage if isinstance(storage, faiss.IndexFlat) else None
    return None


def more_effort(index: faiss.Index, factor: float) -> faiss.SearchParameters | None:
    """Per-call faiss parameters with nprobe / efSearch `factor` times the index's current ones
    (None where the index has neither, or lives on a GPU)."""
    if gpu.device_name(index) == "gpu":
        return None
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        base = more_effort(inner.base_index, factor)
        if base is None:
            return None
        p = faiss.IndexRefineSearchParameters(k_factor=inner.k_factor, base_index_params=base)
        p.base = base  # keep the Python object alive as long as p
        return p
    if isinstance(inner, faiss.IndexPreTransform):
        sub = more_effort(inner.index, factor)
        if sub is None:
            return None
        p = faiss.SearchParametersPreTransform(index_params=sub)
        p.sub = sub
        return p
    if isinstance(inner, faiss.IndexIVF):
        nprobe = min(inner.nlist, int(np.ceil(inner.nprobe * factor)))
        quantizer = faiss.downcast_index(inner.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            qp = faiss.SearchParametersHNSW(efSearch=max(quantizer.hnsw.efSearch, nprobe))
            p = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=qp)
            p.qp = qp
            return p
        return faiss.SearchParametersIVF(nprobe=nprobe)
    if isinstance(inner, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=int(np.ceil(inner.hnsw.efSearch * factor)))
    return None
