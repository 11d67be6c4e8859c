"""Near-duplicate groups in a whole shard collection (dataset curation): `retriever dedup SHARDS`.

Two streaming passes over the shards, never holding the float vectors: the first trains an
inverted-file index and adds every vector as 8-bit scalar-quantised codes (d bytes a vector: 1M ×
512-d is 512 MB, a quarter of the floats); the second streams the vectors again and asks the index
for every neighbour above the threshold (faiss range search over `nprobe` lists). Pairs are joined
with union-find over row numbers (8 bytes a row) into connected components; each group keeps its
first row (lowest position in the collection) as the representative. Scores of SQ8 codes are
within about 0.005 of the exact cosine, so pairs right at the threshold may go either way.

Output (Parquet, one row per member of a group of 2 or more): id, path, group (the
representative's id), representative (bool), group_size, score (the row's highest cosine to
another member it was linked with).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retriever.atomic import atomic_path
from retriever.errors import UserError
from retriever.indexes.settings import configure_faiss
from retriever.shards import ShardSet

EXACT_MAX = 50_000  # below this, an exact flat index (4·d bytes a row) is small and fast enough

# Called with (stage, rows_done, total).
DedupProgress = Callable[[str, int, int], None]


@dataclass
class DedupResult:
    rows: int
    groups: int
    duplicates: int  # rows that are not their group's representative (what removing them would drop)
    pairs: int
    index: str
    seconds: float
    out: str

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def find_duplicates(
    shards: str | Path | ShardSet,
    out: str | Path,
    threshold: float = 0.95,
    *,
    modality: str = "image",
    nprobe: int = 8,
    batch_size: int = 16_384,
    seed: int = 0,
    progress: DedupProgress | None = None,
) -> DedupResult:
    """Write the near-duplicate groups of `shards` (pairs with cosine ≥ threshold, joined
    transitively) to the Parquet file `out` (atomically)."""
    if not -1 <= threshold <= 1:
        raise UserError(f"--threshold must be a cosine similarity between -1 and 1, not {threshold}.")
    if nprobe < 1:
        raise UserError("--nprobe must be at least 1.")
    configure_faiss()
    t0 = time.perf_counter()
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    n = ss.count(modality)
    if n == 0:
        raise UserError(f"{ss.folder} has no {modality} vectors.")
    index, kind = _index_for(ss, modality, n, seed)
    if isinstance(index, faiss.IndexIVF):
        index.nprobe = min(nprobe, index.nlist)
    ids = np.empty(n, np.int64)
    paths: list[str] = []
    done = 0
    for vec, meta in ss.iter_vectors(modality, batch_size, extra_columns=("id", "path")):
        index.add(vec)
        ids[done : done + len(vec)] = meta.column("id").to_numpy()
        paths.extend(meta.column("path").to_pylist())
        done += len(vec)
        if progress:
            progress("index", done, n)
    parent = np.arange(n, dtype=np.int64)
    best = np.full(n, np.nan, np.float32)  # each row's strongest link to another row
    pairs = 0
    done = 0
    for vec, _ in ss.iter_vectors(modality, batch_size, extra_columns=()):
        lims, sims, rows = index.range_search(vec, threshold)
        qrows = np.repeat(np.arange(done, done + len(vec)), np.diff(lims).astype(np.int64))
        keep = rows > qrows  # each pair once, and not the row with itself
        a, b, s = qrows[keep], rows[keep], sims[keep]
        pairs += len(a)
        for x, y in zip(a.tolist(), b.tolist()):
            _union(parent, x, y)
        np.fmax.at(best, a, s)
        np.fmax.at(best, b, s)
        done += len(vec)
        if progress:
            progress("search", done, n)
    roots = np.array([_find(parent, i) for i in range(n)], np.int64)
    sizes = np.bincount(roots, minlength=n)
    grouped = np.flatnonzero(sizes[roots] >= 2)
    rep = roots[grouped]  # union keeps the smaller row as root: the first row of the group
    table = pa.table(
        {
            "id": pa.array(ids[grouped]),
            "path": pa.array([paths[i] for i in grouped.tolist()], pa.string()),
            "group": pa.array(ids[rep]),
            "representative": pa.array(grouped == rep),
            "group_size": pa.array(sizes[rep]),
            "score": pa.array(best[grouped]),
        }
    )
    out = Path(out).expanduser()
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    groups = int((sizes >= 2).sum())
    return DedupResult(
        rows=n,
        groups=groups,
        duplicates=len(grouped) - groups,
        pairs=pairs,
        index=kind,
        seconds=round(time.perf_counter() - t0, 3),
        out=str(out),
    )


def _index_for(ss: ShardSet, modality: str, n: int, seed: int) -> tuple[faiss.Index, str]:
    d = ss.dim
    if n <= EXACT_MAX:
        return faiss.IndexFlatIP(d), "Flat (exact)"
    nlist = int(2 ** round(math.log2(4 * math.sqrt(n))))
    index = faiss.index_factory(d, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
    index.train(ss.sample_vectors(modality, min(n, nlist * 40), seed))
    return index, f"IVF{nlist},SQ8"


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:  # path compression
        parent[i], i = root, parent[i]
    return int(root)


def _union(parent: np.ndarray, a: int, b: int) -> None:
    ra, rb = _find(parent, a), _find(parent, b)
    if ra != rb:
        parent[max(ra, rb)] = min(ra, rb)  # the earlier row stays the root (the representative)
