"""Tune search parameters to a recall target: the cheapest setting whose recall@k reaches it.

Recall@k is measured against exact search on sample queries; "cheapest" is the highest measured
queries per second (batched, on this machine). Each parameter that trades speed for recall
(nprobe, efSearch, the re-rank factor) is walked upwards from cheap until the target is met, so
the grid costs a few searches, not the product of all values.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

# (params, queries, k) -> (scores, rows), searching with those parameters.
SearchFn = Callable[[dict, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class TuneResult:
    params: dict
    recall: float  # recall@k of the chosen setting on the tuning queries
    qps: float  # batched queries per second of the chosen setting
    latency_ms: float  # mean milliseconds per query within the batch (1000 / qps)
    reached: bool  # False: no setting reached the target; params is the best recall found
    target: float
    k: int
    queries: int
    tried: list[dict] = field(default_factory=list)  # every setting measured: params, recall, qps

    def to_dict(self) -> dict:
        return asdict(self)


def exact_knn(queries: np.ndarray, blocks: Iterable[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over vectors streamed block by block (row numbers in order)."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    return knn_ground_truth(
        np.ascontiguousarray(queries, np.float32), blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT
    )


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Fraction of the true top-k rows that appear in the found top-k, averaged over queries."""
    k = min(k, found.shape[1], truth.shape[1])
    hits = faiss.eval_intersection(np.ascontiguousarray(truth[:, :k]), np.ascontiguousarray(found[:, :k]))
    return hits / (len(truth) * k)


def grid(factory: str, ntotal: int, k: int, rerank: str = "") -> list[list[dict]]:
    """Settings to try: outer list = re-rank factors (or one), inner = increasing search effort."""
    if factory == "Flat":
        return [[{}]]
    if factory.startswith("HNSW"):
        return [[{"efSearch": e} for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024) if e >= k]]
    nlist = int(re.findall(r"IVF(\d+)", factory)[0])
    probes = [
        p for p in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 2048) if p <= nlist
    ]
    if probes[-1] != nlist and nlist <= 2048:
        probes.append(nlist)

    def inner(extra: dict) -> list[dict]:
        out = []
        for p in probes:
            d = {"nprobe": p, **extra}
            if "_HNSW" in factory:
                d["quantizer_efSearch"] = max(64, 2 * p)
            out.append(d)
        return out

    if factory.endswith(",RFlat"):
        return [inner({"k_factor_rf": f}) for f in (1, 2, 4, 8, 16, 32)]
    if rerank == "mmap":
        return [inner({"rerank_k_factor": f}) for f in (1, 2, 4, 8, 16, 32)]
    return [inner({})]


def drop_rows(rows: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    """The first k of each row of `rows` other than exclude[i] (a query's own row)."""
    keep = rows != exclude[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in rank order
    return np.take_along_axis(rows, order, 1)[:, :k]


def _retime(search: SearchFn, queries: np.ndarray, k: int, settings: list[dict], rounds: int = 2) -> None:
    """Time the settings that reached the target again, interleaved, keeping each one's best.

    The walk times each setting once, in order, so the first setting that touches new data pays
    for reading it (at 10M with vectors re-ranked from disk, several times slower than its
    neighbours on a cold page cache: benchmarks/RESULTS.md, "Figures behind comments"). The choice
    among the candidates must not depend on which of them ran first.
    """
    if len(settings) < 2:
        return
    for _ in range(rounds):
        for t in settings:
            t0 = time.perf_counter()
            search(t["params"], queries, k)
            t["qps"] = max(t["qps"], len(queries) / (time.perf_counter() - t0))


def tune(
    search: SearchFn,
    queries: np.ndarray,
    truth: np.ndarray,
    k: int,
    target: float,
    settings: list[list[dict]],
    exclude: np.ndarray | None = None,
    plateau: float = 0.002,
) -> TuneResult:
    """Walk each inner list until recall@k ≥ target; keep the fastest setting that reached it.

    `exclude[i]`: a row to ignore in query i's results (the query itself when queries are drawn
    from the indexed data: finding it is free and would inflate recall). An inner walk also stops
    once two more steps of effort gained less than `plateau` recall: e.g. PQ without enough
    re-ranking tops out below the target however many lists it probes.
    """
    tried: list[dict] = []
    limit = None  # once effort level j reached the target, larger factors need no more than j
    extra = 0 if exclude is None else 1
    for inner in settings:
        recalls: list[float] = []
        for j, params in enumerate(inner if limit is None else inner[: limit + 1]):
            t0 = time.perf_counter()
            _, rows = search(params, queries, k + extra)
            dt = time.perf_counter() - t0
            if exclude is not None:
                rows = drop_rows(rows, exclude, k)
            r = recall_at_k(rows, truth, k)
            tried.append({"params": params, "recall": r, "qps": len(queries) / dt})
            recalls.append(r)
            if r >= target:
                limit = j if limit is None else min(limit, j)
                break
            if len(recalls) >= 3 and recalls[-1] - recalls[-3] < plateau:
                break
    ok = [t for t in tried if t["recall"] >= target]
    _retime(search, queries, k + extra, ok)
    best = max(ok, key=lambda t: t["qps"]) if ok else max(tried, key=lambda t: (t["recall"], t["qps"]))
    for t in tried:
        t["recall"], t["qps"] = round(t["recall"], 4), round(t["qps"], 1)
    return TuneResult(
        params=dict(best["params"]),
        recall=best["recall"],
        qps=best["qps"],
        latency_ms=round(1000.0 / best["qps"], 3),
        reached=bool(ok),
        target=target,
        k=k,
        queries=len(queries),
        tried=tried,
    )
