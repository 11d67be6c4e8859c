"""An IVF index built in N parts (processes or machines), then merged on disk into one.

    retriever index SHARDS --out INDEX --part 0/4 --index-type ivfpq   # on 4 machines, I = 0..3
    retriever index merge INDEX                                       # once all 4 are done

The parts work in a staging folder beside the index, `INDEX.parts/`:

    plan.json                  the shard set (names, row counts), N, and per modality the index spec
    trained/{m}.trained.faiss  the coarse quantizer (and PQ codebooks) trained ONCE on a sample
    part-{I}of{N}/             part I's on-disk IVF: its inverted lists, rows and vectors segments
                               (exactly what `add_batches` writes for an --add of its slice)

Part I adds a contiguous slice of the shards (shards [I·S/N, (I+1)·S/N) in name order), so its
faiss ids are the same row numbers a one-process build gives those vectors. The first part to
arrive trains, under a file lock, on the same seeded sample a one-process build draws; the others
wait and reuse it. `merge` moves every part's inverted lists into one `.ivfdata` with faiss's
OnDiskInvertedLists merge (ondisk.merge_on_disk), concatenates the rows files and lists the
vector segments, and writes the index folder atomically: the same lists in the same order as a
one-process `--on-disk` build, hence the same search results.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import faiss
import pyarrow as pa

from retriever import __version__
from retriever.atomic import atomic_dir, clean_stale_siblings, write_json_atomic
from retriever.errors import UserError
from retriever.indexes import memory as select
from retriever.indexes import ondisk
from retriever.indexes.build import (
    BuildConfig,
    add_batches,
    build_querybank,
    new_index,
    plan_index,
    querybank_extra,
    row_bias,
)
from retriever.indexes.choose import IndexSpec
from retriever.indexes.files import damaged, open_rows, read_faiss
from retriever.indexes.manifest import MANIFEST, MODALITIES, IndexManifest, ModalityIndex, check_replaceable
from retriever.indexes.rows import rows_schema
from retriever.locks import folder_lock
from retriever.parts import missing_parts
from retriever.querybank import BANK_FILE, QueryBank, read_querybank, write_querybank
from retriever.shards import ShardSet

PLAN = "plan.json"


def staging_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def parse_part(text: str) -> tuple[int, int]:
    """'I/N' → (I, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UserError(f"--part takes I/N, e.g. 0/4; got {text!r}.") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--part {text}: I must be between 0 and N-1.")
    return i, n


def shard_slice(n_shards: int, part: int, num_parts: int) -> tuple[int, int]:
    return part * n_shards // num_parts, (part + 1) * n_shards // num_parts


def _plan(ss: ShardSet, num_parts: int, cfg: BuildConfig) -> dict:
    cfg = replace(cfg, on_disk=True)
    if cfg.index_type in ("flat", "hnsw"):
        raise UserError("A partitioned index is an IVF index: use --index-type ivf, ivfpq or opq.")
    specs = {}
    for m in MODALITIES:
        n = ss.count(m)
        if not n:
            continue
        kind = cfg.index_type
        if kind == "auto":  # the budget's choice, but always an IVF kind: only those merge on disk
            kind = select.choose_for_budget(n, ss.dim, cfg.max_memory, "auto", cfg.flat_max).kind
            kind = "ivf" if kind in ("flat", "hnsw") else kind
        specs[m] = asdict(plan_index(n, ss.dim, replace(cfg, index_type=kind)))
    if not specs:
        raise UserError(f"{ss.folder} has no rows to index.")
    return {
        "shards": {
            "folder": str(ss.folder),
            "rows": ss.num_rows,
            "files": [{"name": s.path.name, "rows": s.num_rows, "text_rows": s.num_text_rows} for s in ss.shards],
        },
        "model": ss.meta["model"],
        "num_parts": num_parts,
        "seed": cfg.seed,
        "specs": specs,
    }


def prepare(ss: ShardSet, out: Path, num_parts: int, cfg: BuildConfig) -> dict:
    """The staging folder's plan, and trained indexes: made by the first part, checked by the rest."""
    stage = staging_dir(out)
    plan = _plan(ss, num_parts, cfg)
    # The first part to arrive trains; the others wait on the same lock (released by the kernel if
    # the trainer dies), then find the plan and check it.
    with folder_lock(stage, inside=True, tag="-train", wait=True, what="training the quantizer in"):
        if (stage / PLAN).is_file():
            old = _read_plan(stage)
            if old["num_parts"] != num_parts:
                raise UserError(
                    f"{stage} holds a build in {old['num_parts']} parts; this is --part .../{num_parts}: "
                    "use the same N (or delete that folder to start over)."
                )
            if old["shards"]["files"] != plan["shards"]["files"] or old["specs"] != plan["specs"]:
                raise UserError(f"{stage} was planned for other shards or another index type; delete it to start over.")
            return old
        trained = stage / "trained"
        trained.mkdir(parents=True, exist_ok=True)
        bank = build_querybank(ss, cfg)
        if bank is not None:  # every part biases its rows with this one copy
            write_querybank(trained, bank)
        plan["querybank"] = bank.tau if bank is not None else None
        for m, spec_d in plan["specs"].items():
            spec = IndexSpec(**spec_d)
            index = new_index(spec, ss.dim)
            if spec.train_size:
                index.train(ss.sample_vectors(m, spec.train_size, cfg.seed))
            faiss.write_index(index, str(trained / f"{m}.trained.faiss"))
        write_json_atomic(stage / PLAN, plan)  # last: its presence says training finished
        return plan


def build_part(shards: str | Path | ShardSet, out_dir: str | Path, part: int, num_parts: int, cfg: BuildConfig) -> dict:
    """Add part `part`'s slice of the shards to its own on-disk IVF under INDEX.parts/ (resumable:
    a finished part is kept; a killed one is redone)."""
    if cfg.target_recall is not None:
        raise UserError("--target-recall tunes a whole index: tune after `retriever index merge` instead.")
    ss = shards if isinstance(shards, ShardSet) else ShardSet(shards)
    missing_parts(ss.folder)
    out = Path(out_dir).expanduser()
    plan = prepare(ss, out, num_parts, cfg)
    stage = staging_dir(out)
    done_dir = stage / f"part-{part}of{num_parts}"
    if (done_dir / "done.json").is_file():
        return _read_done(stage, part, num_parts, plan)
    lo, hi = shard_slice(len(ss.shards), part, num_parts)
    view = copy.copy(ss)
    view.shards = ss.shards[lo:hi]
    t0 = time.perf_counter()
    entries = {}
    bank = _staged_querybank(stage, plan)
    schema = rows_schema(ss.metadata_fields, querybank=bank is not None)  # as a one-process build's rows file
    with atomic_dir(done_dir) as tmp:
        for m, spec_d in plan["specs"].items():
            spec = IndexSpec(**spec_d)
            first = sum(s.num_rows if m == "image" else s.num_text_rows for s in ss.shards[:lo])
            count = view.count(m)
            entry = _entry(m, spec, ss.dim)
            trained = read_faiss(stage / "trained" / f"{m}.trained.faiss", advice=_start_over(stage))
            shutil.copyfile(stage / "trained" / f"{m}.trained.faiss", tmp / f"{m}.trained.faiss")
            if count:
                add_batches(
                    trained,
                    entry,
                    tmp,
                    view.iter_vectors(m, cfg.batch_size, extra_columns=schema.names),
                    count,
                    schema=schema,
                    first_row=first,
                    on_disk=True,
                    block_rows=select.block_rows(spec, max(count, 1), ss.dim),
                    bias=row_bias(bank, m),
                )
            entries[m] = {**asdict(entry), "first_row": first, "count": count}
        summary = {"part": part, "num_parts": num_parts, "shards": [lo, hi], "seconds": time.perf_counter() - t0}
        write_json_atomic(tmp / "done.json", {**summary, "entries": entries})
    return {**summary, "entries": entries}


def _entry(m: str, spec: IndexSpec, dim: int) -> ModalityIndex:
    return ModalityIndex(
        modality=m,
        count=0,
        dim=dim,
        factory=spec.factory,
        search_params=dict(spec.search_params),
        file=f"{m}.faiss",
        rows_file=f"{m}.rows.arrow",
        rerank=spec.rerank,
    )


def merge_parts(
    out_dir: str | Path, *, wait: bool = False, on_message: Callable[[str], None] | None = None
) -> IndexManifest:
    """Combine every part's inverted lists into one on-disk index folder (written atomically).

    Args:
        out_dir: the index folder the parts were built for (`--out` of `index --part I/N`).
        wait: if another process is writing the index, wait for it instead of refusing.
        on_message: called with a sentence when waiting, and for each leftover of a killed writer
            removed beside the index (under its lock, as `build_index` does).
    """
    out = Path(out_dir).expanduser()
    check_replaceable(out)
    with folder_lock(out, inside=False, wait=wait, on_wait=on_message):
        for line in clean_stale_siblings(out):
            if on_message:
                on_message(line)
        check_replaceable(out)  # again: the folder may have changed while we waited
        return _merge_locked(out)


def _merge_locked(out: Path) -> IndexManifest:
    stage = staging_dir(out)
    if not (stage / PLAN).is_file():
        raise UserError(
            f"No partitioned build for {out} ({stage} has no {PLAN}); run `retriever index --part I/N` first."
        )
    plan = _read_plan(stage)
    n = plan["num_parts"]
    dones = [stage / f"part-{i}of{n}" / "done.json" for i in range(n)]
    missing = [str(i) for i, d in enumerate(dones) if not d.is_file()]
    if missing:
        raise UserError(f"Parts {', '.join(missing)} of {n} have not finished in {stage}; run them before merging.")
    parts = [_read_done(stage, i, n, plan) for i in range(n)]
    for m in plan["specs"]:  # every file opens, before anything is written
        read_faiss(stage / "trained" / f"{m}.trained.faiss", advice=_start_over(stage))
        for i, p in enumerate(parts):
            _check_part_files(stage, i, n, p["entries"][m])
    t0 = time.perf_counter()
    built: dict[str, ModalityIndex] = {}
    bank = _staged_querybank(stage, plan)
    with atomic_dir(out) as tmp:
        if bank is not None:
            write_querybank(tmp, bank)
        for m, spec_d in plan["specs"].items():
            spec = IndexSpec(**spec_d)
            entry = _entry(m, spec, parts[0]["entries"][m]["dim"])
            if bank is not None:
                entry.extra["querybank"] = querybank_extra(bank, m)
            entry.trained_file = f"{m}.trained.faiss"
            shutil.copyfile(stage / "trained" / entry.trained_file, tmp / entry.trained_file)
            blocks, rows_files = [], []
            for i, p in enumerate(parts):
                e = p["entries"][m]
                if not e["count"]:
                    continue
                folder = stage / f"part-{i}of{n}"
                blocks.append(read_faiss(folder / e["file"], faiss.IO_FLAG_ONDISK_SAME_DIR, _redo(stage, i, n)))
                rows_files.append(folder / e["rows_file"])
                for v in e["vectors_files"]:
                    shutil.copyfile(folder / v, tmp / v)
                    entry.vectors_files.append(v)
            entry.ivfdata_file = f"{m}.ivfdata"
            index = ondisk.merge_on_disk(
                faiss.read_index(str(tmp / entry.trained_file)), blocks, tmp / entry.ivfdata_file
            )
            faiss.write_index(index, str(tmp / entry.file))
            del blocks, index
            _concat_rows(rows_files, tmp / entry.rows_file)
            entry.count = sum(p["entries"][m]["count"] for p in parts)
            entry.extra["estimated_memory_bytes"] = select.estimate_bytes(spec, entry.count, entry.dim)
            entry.extra["built_in_parts"] = n
            entry.build_seconds = round(sum(p["seconds"] for p in parts) + time.perf_counter() - t0, 3)
            built[m] = entry
        manifest = IndexManifest(
            model=plan["model"],
            shards=plan["shards"],
            indexes=built,
            retriever_version=__version__,
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        )
        write_json_atomic(tmp / MANIFEST, manifest.to_dict())
    shutil.rmtree(stage, ignore_errors=True)  # the index now holds copies of everything it needs
    return manifest


def _staged_querybank(stage: Path, plan: dict) -> QueryBank | None:
    """The bank the plan's first part staged for every part and the merge (None: the plan has none)."""
    if not plan.get("querybank"):
        return None
    bank = read_querybank(stage / "trained", plan["model"]["weights_sha256"])
    if bank is None:
        raise damaged(stage / "trained" / BANK_FILE, FileNotFoundError("missing or unreadable"), _start_over(stage))
    return bank


def _start_over(stage: Path) -> str:
    return f"the staged build is damaged, delete {stage} and run every `retriever index --part I/N` again"


def _redo(stage: Path, part: int, n: int) -> str:
    return (
        f"part {part} of {n} is damaged, delete {stage / f'part-{part}of{n}'} and run "
        f"`retriever index SHARDS --out {stage.with_name(stage.name.removesuffix('.parts'))} --part {part}/{n}` again"
    )


def _read_json(path: Path, advice: str) -> dict:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise damaged(path, e, advice) from None
    if not isinstance(value, dict):
        raise damaged(path, ValueError(f"a JSON {type(value).__name__}, not an object"), advice)
    return value


def _read_plan(stage: Path) -> dict:
    """plan.json, checked to hold what the parts and the merge read from it."""
    plan = _read_json(stage / PLAN, _start_over(stage))
    try:
        ok = (
            isinstance(plan["num_parts"], int)
            and plan["num_parts"] >= 1
            and isinstance(plan["shards"]["files"], list)
            and all(isinstance(IndexSpec(**spec), IndexSpec) for spec in plan["specs"].values())
            and isinstance(plan["model"], dict)
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise damaged(stage / PLAN, ValueError(f"incomplete: {type(e).__name__} {e}"), _start_over(stage)) from None
    if not ok:
        raise damaged(stage / PLAN, ValueError("incomplete"), _start_over(stage))
    return plan


_ENTRY_KEYS = {"count": int, "dim": int, "file": str, "rows_file": str, "vectors_files": list}


def _read_done(stage: Path, part: int, n: int, plan: dict) -> dict:
    """A finished part's done.json, checked to describe every modality of the plan."""
    path = stage / f"part-{part}of{n}" / "done.json"
    done = _read_json(path, _redo(stage, part, n))
    try:
        entries = done["entries"]
        ok = isinstance(done["seconds"], (int, float)) and all(
            isinstance(entries[m][k], t) for m in plan["specs"] for k, t in _ENTRY_KEYS.items()
        )
    except (KeyError, TypeError) as e:
        raise damaged(path, ValueError(f"incomplete: {type(e).__name__} {e}"), _redo(stage, part, n)) from None
    if not ok:
        raise damaged(path, ValueError("incomplete"), _redo(stage, part, n))
    return done


def _check_part_files(stage: Path, part: int, n: int, entry: dict) -> None:
    """Raise the one sentence unless part `part`'s files for one modality are present and open whole."""
    if not entry["count"]:
        return
    folder = stage / f"part-{part}of{n}"
    advice = _redo(stage, part, n)
    index = read_faiss(folder / entry["file"], faiss.IO_FLAG_ONDISK_SAME_DIR, advice)
    if index.ntotal != entry["count"]:
        raise damaged(
            folder / entry["file"],
            ValueError(f"it holds {index.ntotal} vectors, done.json says {entry['count']}"),
            advice,
        )
    del index
    open_rows(folder / entry["rows_file"], entry["count"], advice)
    for name in entry["vectors_files"]:
        if not (folder / name).is_file():
            raise damaged(folder / name, FileNotFoundError("missing"), advice)


def _concat_rows(files: list[Path], dest: Path) -> None:
    """The parts' rows files end to end (their schema: id, path, caption and any metadata columns)."""
    schema = pa.ipc.open_file(pa.memory_map(str(files[0]), "r")).schema if files else rows_schema()
    with pa.OSFile(str(dest), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for f in files:
            reader = pa.ipc.open_file(pa.memory_map(str(f), "r"))
            for i in range(reader.num_record_batches):
                writer.write_batch(reader.get_batch(i))
