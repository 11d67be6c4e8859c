"""Build faiss indexes from a shard folder by streaming batches: vectors are never held twice."""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import faiss
import numpy as np
import pyarrow as pa

from .. import __version__
from ..errors import UserError
from ..fsutil import atomic_dir, write_json_atomic
from ..shards import ShardSet
from . import gpu
from .factory import FLAT_MAX, IndexSpec, choose_index
from .store import MANIFEST, MODALITIES, IndexManifest, ModalityIndex

ROWS_SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.string()), ("caption", pa.string())])

# Called with (modality, vectors_added, total).
BuildProgress = Callable[[str, int, int], None]


@dataclass
class BuildConfig:
    index_type: str = "auto"  # auto | flat | hnsw | ivf
    flat_max: int = FLAT_MAX
    use_gpu: bool | None = None  # None: when faiss has GPU support and sees a GPU
    batch_size: int = 16_384
    seed: int = 0


def build_index(
    shards: str | Path | ShardSet,
    out_dir: str | Path,
    config: BuildConfig | None = None,
    modalities: Sequence[str] = MODALITIES,
    progress: BuildProgress | None = None,
) -> IndexManifest:
    """Build an image index, and a text index where captions exist; write the folder atomically."""
    cfg = config or BuildConfig()
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    out = Path(out_dir).expanduser()
    built: dict[str, ModalityIndex] = {}
    with atomic_dir(out) as tmp:
        for modality in modalities:
            if ss.count(modality) == 0:
                continue  # no captions anywhere: no text index, search says so
            spec = choose_index(ss.count(modality), ss.dim, cfg.index_type, cfg.flat_max)
            built[modality] = _build_one(ss, modality, spec, tmp, cfg, progress)
        if not built:
            raise UserError(f"{ss.folder} has no rows to index.")
        manifest = IndexManifest(
            model=ss.meta["model"],
            shards={
                "folder": str(ss.folder),
                "rows": ss.num_rows,
                "files": [{"name": s.path.name, "rows": s.num_rows, "text_rows": s.num_text_rows} for s in ss.shards],
            },
            indexes=built,
            retriever_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        write_json_atomic(tmp / MANIFEST, manifest.to_dict())
    return manifest


def new_index(spec: IndexSpec, dim: int) -> faiss.Index:
    return faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)


def set_search_params(index: faiss.Index, params: dict) -> None:
    if not params:
        return
    desc = ",".join(f"{k}={v}" for k, v in params.items())
    space = faiss.GpuParameterSpace() if gpu.device_name(index) == "gpu" else faiss.ParameterSpace()
    space.set_index_parameters(index, desc)


def _build_one(ss: ShardSet, modality: str, spec: IndexSpec, out: Path, cfg: BuildConfig, progress) -> ModalityIndex:
    t0 = time.perf_counter()
    total = ss.count(modality)
    index = new_index(spec, ss.dim)
    on_gpu = (cfg.use_gpu is not False) and gpu.can_use_gpu(index)
    if cfg.use_gpu and not on_gpu:
        raise UserError("--gpu was asked for, but faiss has no GPU support here or the index type cannot run on a GPU.")
    if on_gpu:
        index = gpu.to_gpu(index)
    if spec.train_size:
        index.train(ss.sample_vectors(modality, spec.train_size, cfg.seed))
    rows_path = out / f"{modality}.rows.arrow"
    added = 0
    with pa.OSFile(str(rows_path), "wb") as sink, pa.ipc.new_file(sink, ROWS_SCHEMA) as writer:
        for vectors, meta in ss.iter_vectors(modality, cfg.batch_size, extra_columns=("id", "path", "caption")):
            index.add(np.ascontiguousarray(vectors))
            writer.write_batch(pa.record_batch([meta.column(c) for c in ROWS_SCHEMA.names], schema=ROWS_SCHEMA))
            added += len(vectors)
            if progress:
                progress(modality, added, total)
    index = gpu.to_cpu(index)
    if index.ntotal != total:
        raise RuntimeError(f"{modality} index holds {index.ntotal} vectors, expected {total}")
    faiss.write_index(index, str(out / f"{modality}.faiss"))
    return ModalityIndex(
        modality=modality,
        count=int(index.ntotal),
        dim=ss.dim,
        factory=spec.factory,
        search_params=dict(spec.search_params),
        file=f"{modality}.faiss",
        rows_file=rows_path.name,
        built_on="gpu" if on_gpu else "cpu",
        build_seconds=round(time.perf_counter() - t0, 3),
    )
