"""Source → encoder → Parquet shards, resumable and tolerant of bad files.

Items are cut into fixed shards by position: shard k holds items [k·S, (k+1)·S). A shard file
appears only when complete (atomic rename), so on a rerun with the same arguments every existing
shard is kept and only missing ones are computed: no row lost, none duplicated. Files that fail to
decode are skipped and listed in `_errors.jsonl` (path, reason); the errors of a shard are written
before the shard itself, so a crash between the two loses nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from retriever import __version__, parts
from retriever.atomic import write_json_atomic
from retriever.data.loading import DecodedBatch, ImageDataset, collate_decoded
from retriever.data.sources import SourceItem
from retriever.embed_config import EmbedConfig
from retriever.errors import UserError
from retriever.locks import folder_lock
from retriever.models.encode import count_truncated, encode_image_tensors, encode_texts
from retriever.models.load import LoadedModel
from retriever.shards import (
    SHARD_GLOB,
    check_shard_folder,
    metadata_fields,
    metadata_key,
    shard_schema,
    write_shard,
)
from retriever.skipped import ERRORS_FILE, SkippedImages, read_skipped, skipped_entry, write_skipped

JOB_FILE = "_embed_job.json"


@dataclass
class EmbedResult:
    """What `embed_items` did: rows and shards in the folder, and what this run wrote or kept."""

    out_dir: str
    rows: int  # rows in the folder after this run
    shards: int
    shards_written: int  # by this run
    shards_resumed: int  # already complete and kept
    seconds: float
    images_per_second: float
    skipped: SkippedImages = field(default_factory=SkippedImages)  # all runs' skipped images
    repairs: list[str] = field(default_factory=list)  # what this run cleaned up after a killed one
    truncated_captions: int = 0  # captions (in shards written by this run) longer than the text context
    text_context: int | None = None  # the tokenizer's context length, in tokens


# Called after each batch with (images_done_in_this_run, total_to_do_in_this_run).
ProgressFn = Callable[[int, int], None]


def embed_items(
    items: Sequence[SourceItem],
    encoder: LoadedModel,
    out_dir: str | Path,
    config: EmbedConfig | None = None,
    progress: ProgressFn | None = None,
    *,
    wait: bool = False,
    on_message: Callable[[str], None] | None = None,
    skipped: Sequence[dict] = (),
    onnx=None,
) -> EmbedResult:
    """Embed every item into shards under `out_dir`, resuming whatever a previous run finished.

    Args:
        items: what to embed (`read_source`); an item's `index` becomes its row id.
        encoder: the loaded model (`load_model`); its identity is stored with every shard.
        out_dir: the shard folder; finished shards of an identical earlier run are kept.
        config: shard size, batch sizes, workers, storage dtype, part (`EmbedConfig`).
        progress: called after each batch with (images done, images to do) of this run.
        wait: if another process is writing this run's files in `out_dir` (the folder, or this
            part of it), wait for it instead of refusing. The folder must be new, empty or a shard
            folder, and is locked while this runs (per part when `config.num_parts` > 1, so parts
            run side by side while two writers of one part still exclude each other).
        on_message: called with a sentence when waiting, and for each thing removed under the
            lock: this run's temp files of killed runs, and its unreadable shards (then redone).
        skipped: entries the source reader left out ({"path", "reason"}: a bad tar, a key without
            an image, a caption that is not text; see `SourceList.skipped`); they are listed in the
            errors file with the images that failed to decode.
        onnx: an OnnxEncoder (retriever.onnx.runtime) of the same model to run the forward passes
            on onnxruntime; decoding and preprocessing stay the torch path's, so shards are interchangeable.

    Returns:
        An `EmbedResult`; undecodable images are skipped and listed in `out_dir/_errors.jsonl`
        (`_errors-pIofN.jsonl` for part I of N).
    """
    cfg = config or EmbedConfig()
    cfg.validate()
    if onnx is not None:
        encoder.identity.check_same(onnx.identity, f"The ONNX export in {onnx.folder}")
    if not items:
        raise UserError("Nothing to embed: the source is empty.")
    out = Path(out_dir).expanduser()
    # A streamed manifest knows its columns' types; other sources are typed over every item's values.
    fields = getattr(items, "metadata_fields", None)
    if fields is None:
        fields = metadata_fields(it.metadata for it in items)
    schema = shard_schema(encoder.identity, cfg.dtype, fields)
    job = {
        "retriever_version": __version__,
        "source_sha256": _source_digest(items),
        "items": len(items),
        "shard_size": cfg.shard_size,
        "dtype": cfg.dtype,
        "model": encoder.identity.to_dict(),
    }
    if fields:  # absent without metadata, so folders embedded before metadata columns still resume
        job["metadata_columns"] = {f.name: str(f.type) for f in fields}
    parts.check_part(cfg.part, cfg.num_parts)
    check_shard_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    lock_tag = parts.tag(cfg.part, cfg.num_parts)  # "" for a one-process run: the folder's lock
    with folder_lock(out, inside=True, tag=lock_tag, wait=wait, on_wait=on_message, what="embedding into"):
        return _embed_locked(items, encoder, out, cfg, schema, job, progress, on_message, skipped, onnx)


def _embed_locked(
    items, encoder, out: Path, cfg: EmbedConfig, schema, job, progress, on_message, skipped, onnx
) -> EmbedResult:
    if cfg.num_parts > 1:
        job.update(num_parts=cfg.num_parts, part=cfg.part)
        _prepare_part_dir(out, job, cfg.overwrite)
    else:
        _prepare_out_dir(out, job, cfg.overwrite)
    repairs = _remove_leftovers(out, cfg.part, cfg.num_parts)
    for line in repairs:
        if on_message:
            on_message(line)
    errors_name = parts.errors_file(cfg.part, cfg.num_parts)

    n_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
    mine = [k for k in range(n_shards) if parts.owns(k, cfg.part, cfg.num_parts)]
    done = {k for k in mine if (out / parts.shard_file(k, cfg.part, cfg.num_parts)).is_file()}
    todo = [k for k in mine if k not in done]
    # Source-level entries (shard None) are those of this run's reading of the source; part 0 lists
    # them (every part reads the same source).
    errors = [{**e, "shard": None} for e in (skipped if cfg.part == 0 else ())] + [
        e for e in read_skipped(out, errors_name) if e.get("shard") in done
    ]
    write_skipped(out, errors, errors_name)

    t0 = time.perf_counter()
    n_todo = sum(len(_shard_items(items, k, cfg.shard_size)) for k in todo)
    n_seen = truncated = rows_written = 0
    for k, batches in _decoded_shards(items, todo, encoder, cfg):
        chunk = _shard_items(items, k, cfg.shard_size)
        ids, paths, captions, vecs, shard_errors, metas = [], [], [], [], [], []
        for batch in batches:
            for pos, reason in batch.errors:
                it = chunk[pos]
                shard_errors.append(skipped_entry(it.path, reason, id=it.index, shard=k))
            if batch.pixels is not None:
                vecs.append(
                    encode_image_tensors(encoder, batch.pixels)
                    if onnx is None
                    else onnx.encode_pixels(batch.pixels.numpy())
                )
                for pos in batch.indices:
                    ids.append(chunk[pos].index)
                    paths.append(chunk[pos].path)
                    captions.append(chunk[pos].caption)
                    metas.append({metadata_key(key): v for key, v in chunk[pos].metadata.items()})
            n_seen += len(batch.indices) + len(batch.errors)
            if progress:
                progress(n_seen, n_todo)
        img = np.concatenate(vecs) if vecs else np.zeros((0, encoder.embed_dim), np.float32)
        has_text = np.array([c is not None for c in captions], bool)
        txt = np.zeros_like(img)
        if has_text.any():
            texts = [c for c in captions if c is not None]
            txt[has_text] = (
                encode_texts(encoder, texts, cfg.text_batch_size)
                if onnx is None
                else onnx.encode_texts(texts, cfg.text_batch_size)
            )
            truncated += count_truncated(encoder.tokenizer, texts)
        # Errors first: if we die between the two writes, the rerun redoes this shard and rewrites them.
        errors.extend(shard_errors)
        write_skipped(out, errors, errors_name)
        write_shard(
            out / parts.shard_file(k, cfg.part, cfg.num_parts), schema, ids, paths, captions, img, txt, has_text, metas
        )
        rows_written += len(ids)

    seconds = time.perf_counter() - t0
    rows = rows_written + count_rows(out, [parts.shard_file(k, cfg.part, cfg.num_parts) for k in sorted(done)])
    return EmbedResult(
        out_dir=str(out),
        rows=rows,
        shards=len(mine),
        shards_written=len(todo),
        shards_resumed=len(done),
        seconds=seconds,
        images_per_second=n_seen / seconds if seconds > 0 and n_seen else 0.0,
        skipped=SkippedImages(errors, str(out / errors_name) if errors else None),
        repairs=repairs,
        truncated_captions=truncated,
        text_context=getattr(encoder.tokenizer, "context_length", None),
    )


def _decoded_shards(items, todo, encoder: LoadedModel, cfg: EmbedConfig):
    """Yield (shard number, iterator of DecodedBatch) with decoding overlapped in workers.

    One DataLoader covers every pending shard (workers start once); batches never straddle shards.
    """
    paths: list[str] = []
    batch_plan: list[tuple[int, list[int]]] = []
    for k in todo:
        chunk = _shard_items(items, k, cfg.shard_size)
        base = len(paths)
        paths.extend(it.path for it in chunk)
        for lo in range(0, len(chunk), cfg.batch_size):
            batch_plan.append((k, list(range(base + lo, base + min(lo + cfg.batch_size, len(chunk))))))
    if not batch_plan:
        return
    loader = torch.utils.data.DataLoader(
        ImageDataset(paths, encoder.preprocess, cfg.max_pixels),
        batch_sampler=[idx for _, idx in batch_plan],
        num_workers=cfg.num_workers,
        collate_fn=collate_decoded,
        pin_memory=encoder.device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if cfg.num_workers > 0 else None,
    )
    batches = iter(loader)
    starts: dict[int, int] = {}
    for k, idx in batch_plan:
        starts.setdefault(k, idx[0])
    i = 0
    while i < len(batch_plan):
        k = batch_plan[i][0]
        n = 0
        while i + n < len(batch_plan) and batch_plan[i + n][0] == k:
            n += 1
        yield k, _relative(batches, n, starts[k])
        i += n


def _relative(batches, n: int, start: int):
    """Take n batches, renumbering dataset positions to positions within the shard."""
    for _ in range(n):
        b: DecodedBatch = next(batches)
        yield DecodedBatch([i - start for i in b.indices], b.pixels, [(i - start, r) for i, r in b.errors])


def _shard_items(items, k: int, size: int):
    return items[k * size : (k + 1) * size]


def _source_digest(items: Sequence[SourceItem]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.index, it.path, it.caption]).encode())
    return h.hexdigest()


def _prepare_out_dir(out: Path, job: dict, overwrite: bool) -> None:
    job_path = out / JOB_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder.")
    if out.is_dir() and parts.parts_status(out) is not None:
        # Its parts hold their own locks, not this one: replacing their shards could race a running part.
        raise UserError(f"{out} holds a --num-parts embed; a one-process run needs its own --out folder.")
    existing = list(out.glob(SHARD_GLOB)) if out.is_dir() else []
    if job_path.is_file():
        try:
            old = json.loads(job_path.read_bytes())
        except ValueError:
            old = None  # damaged: cannot show the shards match this job, so treat them as another job's
        if old != job:
            if not overwrite:
                raise UserError(
                    f"{out} holds shards made with other arguments (source, model, shard size or dtype); "
                    "use a new --out folder or pass --overwrite to replace them."
                )
            for p in existing + [out / ERRORS_FILE]:
                p.unlink(missing_ok=True)
    elif existing:
        if not overwrite:
            raise UserError(f"{out} already holds shards not made by this job; use a new --out or --overwrite.")
        for p in existing:
            p.unlink()
    write_json_atomic(job_path, job)


def _is_own(name: str, part: int, num_parts: int) -> bool:
    """Whether a file of the shard folder (or its temp file) is this run's: this part's (its name
    carries the tag -pIofN), or, for a one-process run, one whose name carries no part tag."""
    found = parts.part_of_name(name)
    return found == (part, num_parts) if num_parts > 1 else found is None


def _remove_leftovers(out: Path, part: int = 0, num_parts: int = 1) -> list[str]:
    """Under this run's lock: delete its temp files of killed runs and its shards that cannot be read.

    Only a dead process can have left one of this run's `.*.tmp` here, because a live one would
    hold the same lock; other parts' files are never touched (they may be writing now). A shard
    that Parquet cannot open (a disk filled up, a copy cut short) is deleted so that this run
    redoes it instead of counting it as done.
    """
    import pyarrow.parquet as pq

    done = []
    for stale in sorted(out.glob(".*.tmp")):  # no `finally` survives kill -9
        if _is_own(stale.name, part, num_parts):
            stale.unlink(missing_ok=True)
            done.append(f"Removed {stale.name}, left in {out} by a killed run.")
    for shard in sorted(out.glob(SHARD_GLOB)):
        if not _is_own(shard.name, part, num_parts):
            continue
        try:
            pq.ParquetFile(shard).metadata  # noqa: B018 (reading the footer is the check)
        except Exception as e:  # noqa: BLE001 (any failure to read the footer means the file is damaged)
            shard.unlink()
            done.append(f"Removed unreadable shard {shard.name} ({type(e).__name__}); it is embedded again.")
    return done


def _prepare_part_dir(out: Path, job: dict, overwrite: bool) -> None:
    """Like _prepare_out_dir for one part: only this part's files are ever replaced or cleaned."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder.")
    if overwrite:
        raise UserError("--overwrite cannot be combined with --num-parts (it would delete other parts' shards).")
    if out.is_dir():
        parts.check_compatible(out, job)
        own_job = out / parts.job_file(job["part"], job["num_parts"])
        strangers = [
            p.name for p in out.glob(SHARD_GLOB) if parts.part_of_name(p.name) != (job["part"], job["num_parts"])
        ]
        if not own_job.is_file() and any(parts.part_of_name(n) is None for n in strangers):
            raise UserError(f"{out} already holds shards not made by this job; use a new --out.")
        if own_job.is_file() and json.loads(own_job.read_text()) != job:
            raise UserError(f"{out} holds this part's shards made with other arguments; use a new --out.")
    out.mkdir(parents=True, exist_ok=True)
    # This part's leftover temp files are removed by _remove_leftovers, under this part's lock.
    write_json_atomic(out / parts.job_file(job["part"], job["num_parts"]), job)


def count_rows(out: Path, names: Sequence[str] | None = None) -> int:
    """Rows of the named shards of `out` (default: all of them), from their Parquet footers: one small
    read per file, none of the rows.

    embed_items counts only its own kept shards (and adds the rows it wrote): another part's may be
    written, repaired or damaged meanwhile, and counting them made a part's result depend on how far
    the others had got."""
    import pyarrow.parquet as pq

    if names is None:
        names = sorted(p.name for p in out.glob(SHARD_GLOB))
    return sum(pq.ParquetFile(out / name).metadata.num_rows for name in names)
