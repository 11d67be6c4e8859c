"""Build faiss indexes from a shard folder by streaming batches: vectors are never held twice.

Training uses a random sample read shard by shard; vectors are then added batch by batch. With a
memory budget the index kind comes from select.choose_for_budget; indexes whose inverted lists do
not fit are built in blocks merged on disk (ondisk.py). With a recall target the search
parameters are tuned against exact search (tune.py) and the result stored in the manifest.
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa

from retriever import __version__
from retriever.atomic import atomic_dir, clean_stale_siblings, write_json_atomic
from retriever.errors import UserError
from retriever.indexes import gpu, ondisk, tune
from retriever.indexes import memory as select
from retriever.indexes.choose import IndexSpec, choose_index
from retriever.indexes.config import BuildConfig
from retriever.indexes.manifest import MANIFEST, MODALITIES, IndexManifest, ModalityIndex, check_replaceable
from retriever.indexes.open import set_search_params
from retriever.indexes.rerank import VectorStore, VectorWriter, search_index
from retriever.indexes.rows import conform, iter_file_batches, rows_schema, with_column
from retriever.indexes.settings import configure_faiss
from retriever.locks import folder_lock
from retriever.parts import missing_parts
from retriever.querybank import BIAS_COLUMN, QueryBank, model_querybank, write_querybank
from retriever.shards import ShardSet

# Called with (modality, vectors_added, total).
BuildProgress = Callable[[str, int, int], None]


def build_index(
    shards: str | Path | ShardSet,
    out_dir: str | Path,
    config: BuildConfig | None = None,
    modalities: Sequence[str] = MODALITIES,
    progress: BuildProgress | None = None,
    *,
    wait: bool = False,
    on_message: Callable[[str], None] | None = None,
) -> IndexManifest:
    """Build an image index, and a text index where captions exist; write the folder atomically.

    `out_dir` may be new, empty or an existing retriever index (replaced); anything else is refused.

    Args:
        shards: a shard folder (`embed_items`) or an open `ShardSet`.
        out_dir: the index folder to write (replaced atomically).
        config: index type, memory budget, recall target, GPU use (`BuildConfig`).
        modalities: which indexes to build, of "image" and "text".
        progress: called with (modality, rows done, rows to do).
        wait: if another process is writing `out_dir`, wait for it instead of refusing.
        on_message: called with a sentence when waiting, and for each thing a killed writer left
            beside the folder that is removed (under the lock).

    Returns:
        The `IndexManifest` written to `out_dir/manifest.json`.
    """
    configure_faiss()
    cfg = config or BuildConfig()
    cfg.validate()
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    missing_parts(ss.folder)
    out = Path(out_dir).expanduser()
    specs = {m: plan_index(ss.count(m), ss.dim, cfg) for m in modalities if ss.count(m)}
    if not specs:
        raise UserError(f"{ss.folder} has no rows to index.")
    check_replaceable(out, ss.folder)
    with folder_lock(out, inside=False, wait=wait, on_wait=on_message):
        for line in clean_stale_siblings(out):
            if on_message:
                on_message(line)
        check_replaceable(out, ss.folder)  # again: the folder may have changed while we waited
        return _build_into(ss, out, specs, cfg, progress)


def _build_into(ss: ShardSet, out: Path, specs: dict[str, IndexSpec], cfg: BuildConfig, progress) -> IndexManifest:
    built: dict[str, ModalityIndex] = {}
    bank = build_querybank(ss, cfg)
    with atomic_dir(out) as tmp:
        if bank is not None:
            write_querybank(tmp, bank)  # --add biases its new rows with the same bank
        for modality, spec in specs.items():
            built[modality] = _build_one(ss, modality, spec, tmp, cfg, progress, bank)
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


def plan_index(n: int, d: int, cfg: BuildConfig) -> IndexSpec:
    """The index to build for n vectors under cfg's type, budget and on-disk choices."""
    spec = select.choose_for_budget(n, d, cfg.max_memory, cfg.index_type, cfg.flat_max)
    if cfg.on_disk and not spec.on_disk:
        if spec.kind in ("flat", "hnsw"):
            raise UserError("On-disk inverted lists need an IVF index (--index-type ivf, ivfpq or opq).")
        spec = choose_index(n, d, spec.kind, rerank="mmap", on_disk=True)
        spec = replace(spec, memory_bytes=select.estimate_bytes(spec, n, d))
    return spec


def new_index(spec: IndexSpec, dim: int) -> faiss.Index:
    index = faiss.index_factory(dim, spec.factory, faiss.METRIC_INNER_PRODUCT)
    inner = faiss.downcast_index(index)
    if isinstance(inner, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        inner = faiss.downcast_index(inner.base_index)
    if isinstance(inner, faiss.IndexPreTransform):
        for i in range(inner.chain.size()):
            vt = faiss.downcast_VectorTransform(inner.chain.at(i))
            if isinstance(vt, faiss.OPQMatrix):
                # faiss's default of 50 iterations took 76 s for 20k×64-d vectors on 2 cores; the
                # rotation barely improves after 10, and re-ranking repairs the rest.
                vt.niter = 10
    return index


def _place_for_build(spec: IndexSpec, dim: int, total: int, cfg: BuildConfig) -> tuple[faiss.Index, bool]:
    """The new index, on one GPU when that helps and fits: (index, whether it is on a GPU).

    Only IVF kinds gain from a GPU while building (k-means and assigning vectors to lists); a Flat
    index is a copy of the vectors and is built where it is saved, in float32. One GPU, never
    shards: the quantizer is trained once, and the full index is split across GPUs only when a
    search opens it (gpu.to_gpu).
    """
    if cfg.use_gpu and spec.on_disk:
        raise UserError("On-disk inverted lists are built and searched on the CPU; drop --gpu.")
    n_gpus = gpu.gpu_count() if cfg.use_gpu is not False and not spec.on_disk else 0
    if spec.kind == "flat" or n_gpus == 0:
        if cfg.use_gpu and spec.kind != "flat":
            raise UserError("--gpu was asked for, but faiss has no GPU support here (see README: GPU).")
        return new_index(spec, dim), False
    index = new_index(gpu_spec(spec), dim)
    plan = gpu.gpu_plan(index, n_gpus, gpu.gpu_bytes(index, total), gpu._gpu_free_bytes(), allow_shard=False)
    if not plan.ok:
        if cfg.use_gpu:
            raise UserError(f"--gpu was asked for, but this index cannot be built on the GPU: {plan.reason}.")
        return new_index(spec, dim), False
    index = gpu.to_gpu(index, plan)
    return index, gpu.device_name(index) == "gpu"


def gpu_spec(spec: IndexSpec) -> IndexSpec:
    """The spec as built on a GPU: a flat coarse quantizer instead of HNSW (gpu.gpu_friendly_factory),
    without the HNSW quantizer's search parameter."""
    factory = gpu.gpu_friendly_factory(spec.factory)
    if factory == spec.factory:
        return spec
    params = {k: v for k, v in spec.search_params.items() if not k.startswith("quantizer_")}
    return replace(spec, factory=factory, search_params=params)


def _build_one(
    ss: ShardSet, modality: str, spec: IndexSpec, out: Path, cfg: BuildConfig, progress, bank: QueryBank | None = None
) -> ModalityIndex:
    t0 = time.perf_counter()
    total = ss.count(modality)
    index, on_gpu = _place_for_build(spec, ss.dim, total, cfg)
    if on_gpu:
        spec = gpu_spec(spec)
    if spec.train_size:
        sample = ss.sample_vectors(modality, spec.train_size, cfg.seed)
        index.train(sample)
        del sample
    index = gpu.to_cpu(index) if spec.on_disk else index
    entry = ModalityIndex(
        modality=modality,
        count=0,
        dim=ss.dim,
        factory=spec.factory,
        search_params=dict(spec.search_params),
        file=f"{modality}.faiss",
        rows_file=f"{modality}.rows.arrow",
        built_on="gpu" if on_gpu else "cpu",
        rerank=spec.rerank,
    )
    schema = rows_schema(ss.metadata_fields, querybank=bank is not None)
    if bank is not None:
        entry.extra["querybank"] = querybank_extra(bank, modality)
    batches = ss.iter_vectors(modality, cfg.batch_size, extra_columns=schema.names)
    index = add_batches(
        index,
        entry,
        out,
        batches,
        total,
        schema=schema,
        on_disk=spec.on_disk,
        progress=progress,
        block_rows=select.block_rows(spec, total, ss.dim),
        bias=row_bias(bank, modality),
    )
    index = gpu.to_cpu(index)
    if index.ntotal != total:
        raise RuntimeError(f"{modality} index holds {index.ntotal} vectors, expected {total}")
    entry.count = int(index.ntotal)
    entry.extra["estimated_memory_bytes"] = spec.memory_bytes or select.estimate_bytes(spec, total, ss.dim)
    if cfg.max_memory is not None:
        entry.extra["max_memory_bytes"] = cfg.max_memory
    if cfg.target_recall is not None:
        result = tune_index(index, entry, out, ss, modality, cfg)
        entry.search_params = result.params
        entry.extra["tuning"] = result.to_dict()
    if not entry.ivfdata_file:  # an on-disk index was written when its lists were merged
        faiss.write_index(index, str(out / entry.file))
    entry.build_seconds = round(time.perf_counter() - t0, 3)
    return entry


def add_batches(
    index: faiss.Index,
    entry: ModalityIndex,
    out: Path,
    batches: Iterator[tuple[np.ndarray, pa.RecordBatch]],
    count: int,
    *,
    schema: pa.Schema | None = None,
    first_row: int = 0,
    on_disk: bool = False,
    old_rows: Path | None = None,
    old_ivf: faiss.Index | None = None,
    progress: BuildProgress | None = None,
    block_rows: int = 1_000_000,
    bias: Callable[[np.ndarray], np.ndarray] | None = None,
) -> faiss.Index:
    """Add `count` streamed vectors as rows first_row… and write the files that go with them.

    Used by build and by --add: the rows file (old rows copied first), a vectors segment when the
    index re-ranks from disk, and for on-disk indexes the blocks merged (with `old_ivf`'s lists)
    into a fresh .ivfdata. `bias` gives the rows' querybank bias column (`row_bias`). Returns the
    index holding old and new rows.
    """
    rows_path = out / entry.rows_file
    schema = schema or rows_schema()
    writer_vec = None
    if entry.rerank == "mmap":
        name = f"{entry.modality}.vectors.npy" if first_row == 0 else f"{entry.modality}.vectors.{first_row}.npy"
        writer_vec = VectorWriter(out / name, count, entry.dim)
        entry.vectors_files.append(name)
    on_disk = on_disk or bool(entry.ivfdata_file)
    trained_path = out / f"{entry.modality}.trained.faiss"
    if on_disk and first_row == 0:
        faiss.write_index(index, str(trained_path))
        entry.trained_file = trained_path.name
    blocks: list[Path] = []
    block = None
    added = 0
    with pa.OSFile(str(rows_path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        if old_rows is not None:
            for b in iter_file_batches(old_rows):
                writer.write_batch(b)
        for vectors, meta in batches:
            vectors = np.ascontiguousarray(vectors)
            ids = np.arange(first_row + added, first_row + added + len(vectors), dtype=np.int64)
            if on_disk:
                if block is None:
                    block = faiss.read_index(str(trained_path))
                block.add_with_ids(vectors, ids)
                if block.ntotal >= block_rows:
                    blocks.append(_write_block(block, out, len(blocks)))
                    block = None
            else:
                index.add(vectors)  # in RAM, faiss numbers rows ntotal…, which is first_row + added
            if writer_vec is not None:
                writer_vec.write(vectors)
            if bias is not None:
                meta = with_column(meta, BIAS_COLUMN, pa.array(bias(vectors), pa.float32()))
            writer.write_batch(conform(meta, schema))
            added += len(vectors)
            if progress:
                progress(entry.modality, added, count)
    if writer_vec is not None:
        writer_vec.close()
    if added != count:
        raise RuntimeError(f"{entry.modality}: streamed {added} vectors, expected {count}")
    if on_disk:
        if block is not None:
            blocks.append(_write_block(block, out, len(blocks)))
        parts = ([old_ivf] if old_ivf is not None else []) + [ondisk.read_block(p) for p in blocks]
        entry.ivfdata_file = f"{entry.modality}.ivfdata"
        index = ondisk.merge_on_disk(faiss.read_index(str(trained_path)), parts, out / entry.ivfdata_file)
        faiss.write_index(index, str(out / entry.file))
        del parts
        for p in blocks:
            p.unlink()
        index = ondisk.open_on_disk(out / entry.file)
    return index


def build_querybank(ss: ShardSet, cfg: BuildConfig) -> QueryBank | None:
    """The bank an index of `ss` biases its rows with: its model folder's, unless turned off."""
    return model_querybank(ss.identity.name, ss.identity.weights_sha256) if cfg.querybank else None


def querybank_extra(bank: QueryBank, modality: str) -> dict:
    """What a `modality` index's manifest entry records of its bank."""
    return {"tau": bank.tau, "bank_rows": len(bank.bank_for(modality))}


def row_bias(bank: QueryBank | None, modality: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The querybank bias of a batch of `modality` vectors, for `add_batches` (None: no bank)."""
    if bank is None:
        return None
    return lambda vectors: bank.bias(vectors, modality)


def _write_block(block: faiss.Index, out: Path, i: int) -> Path:
    path = out / f".block-{i:04d}.faiss"
    faiss.write_index(block, str(path))
    return path


def tune_index(index: faiss.Index, entry: ModalityIndex, folder: Path, ss: ShardSet, modality: str, cfg: BuildConfig):
    """Tune entry's search parameters on queries drawn from the shards; exact truth by streaming.

    A query drawn from the data finds itself at rank 1 in every index, which would inflate
    recall; its own row (the exact top-1) is left out of both truth and results, so recall@k is
    measured on its k other neighbours, as for an unseen query from the same distribution.
    """
    self_excluded = entry.count > 1  # a one-row index has no other neighbour to find
    nq = min(cfg.tune_queries, entry.count)
    k = min(cfg.k, entry.count - self_excluded)
    queries = np.ascontiguousarray(ss.sample_vectors(modality, nq, cfg.seed + 1))
    blocks = (v for v, _ in ss.iter_vectors(modality, extra_columns=()))
    _, truth = tune.exact_knn(queries, blocks, k + self_excluded)
    exclude = truth[:, 0] if self_excluded else None
    truth = truth[:, int(self_excluded) :]
    store = VectorStore([folder / f for f in entry.vectors_files]) if entry.rerank == "mmap" else None

    def search(params, q, kk):
        set_search_params(index, params)
        return search_index(index, q, kk, params, store)

    try:
        return tune.tune(
            search,
            queries,
            truth,
            k,
            cfg.target_recall or 0.0,  # only called when a target is set
            tune.grid(entry.factory, entry.count, k, entry.rerank),
            exclude,
        )
    finally:
        if store is not None:
            store.close()
