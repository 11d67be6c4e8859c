"""`retriever index`: build FAISS indexes from shards, or add shards to one."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retriever.cli.common import IndexType, JsonOpt, WaitOpt, err, note, out, progress_bar, user_errors
from retriever.errors import UserError
from retriever.indexes.config import BuildConfig

# Option defaults are the library's: one source of truth (indexes/config.py imports no faiss).
BUILD = BuildConfig()


@user_errors
def index(
    shards: Path = typer.Argument(..., help="Shard folder written by `retriever embed` (with --add: the new shards)."),
    target: Path | None = typer.Argument(None, help="With --add: the existing index folder to extend."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Index folder to write (replaced atomically)."),
    index_type: IndexType = typer.Option(
        IndexType(BUILD.index_type),
        help="auto: chosen from N, d and --max-memory; flat, hnsw, ivf (IVF-Flat), ivfpq (IVF-PQ + exact re-rank), opq (OPQ + IVF-HNSW + PQ + re-rank).",
    ),
    max_memory: str | None = typer.Option(
        None, "--max-memory", help="RAM budget for the index, e.g. 4G or 512M (default: no limit)."
    ),
    target_recall: float | None = typer.Option(
        BUILD.target_recall,
        "--target-recall",
        help="Tune search parameters to reach this recall@k against exact search, e.g. 0.95.",
    ),
    k: int = typer.Option(BUILD.k, "--k", help="The k of recall@k for --target-recall."),
    on_disk: bool = typer.Option(
        BUILD.on_disk,
        "--on-disk",
        help="Keep IVF inverted lists on disk (memory-mapped) even when RAM would hold them.",
    ),
    add: bool = typer.Option(False, "--add", help="Append SHARDS to the index TARGET without retraining."),
    renumber: bool = typer.Option(
        False,
        "--renumber",
        help="With --add: shift new ids past the index's largest id instead of refusing clashing ids.",
    ),
    gpu: bool | None = typer.Option(
        BUILD.use_gpu, "--gpu/--no-gpu", help="Build on the GPU (default: when faiss sees one)."
    ),
    wait: bool = WaitOpt,
    part: str | None = typer.Option(
        None,
        "--part",
        help="I/N: add slice I of N of the shards to its own IVF blocks (one process or machine each); "
        "then `retriever index merge INDEX`.",
    ),
    as_json: bool = JsonOpt,
    onnx: bool = typer.Option(
        True, "--onnx/--no-onnx", help="Also export the model's towers to INDEX/onnx for torch-free queries."
    ),
    querybank: bool = typer.Option(
        BUILD.querybank,
        "--querybank/--no-querybank",
        help="Store each row's querybank bias when the model folder has a bank (retriever train writes one), "
        "so that text→image and image→text searches rank hubs lower.",
    ),
):
    """Build FAISS indexes (image, and text where captions exist) from shards, or --add shards to one.

    `retriever index merge INDEX` combines the parts of a `--part I/N` build into INDEX.
    """
    if str(shards) == "merge" and not shards.exists():
        return _merge(target, wait, as_json)
    if part is not None:
        return _build_part(shards, out_dir, part, index_type, max_memory, target_recall, add, as_json, querybank)
    from retriever.indexes import build_index
    from retriever.indexes.add import add_to_index
    from retriever.indexes.memory import parse_memory
    from retriever.shards import ShardSet

    if add:
        if target is None or out_dir is not None:
            raise UserError(
                "--add takes the new shard folder and the index folder: retriever index --add NEW_SHARDS INDEX."
            )
        if target_recall is not None or max_memory is not None or index_type.value != BUILD.index_type:
            raise UserError("--add keeps the index's type and tuned parameters; rebuild to change them.")
    elif out_dir is None:
        raise UserError("Give the index folder to write with --out (or use --add NEW_SHARDS INDEX).")
    elif target is not None:
        raise UserError(f"Unexpected second folder {target}; did you mean --add?")
    ss = ShardSet(shards)
    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(modality, n, total):
            if modality not in tasks:
                tasks[modality] = bar.add_task(f"Indexing {modality}", total=total)
            bar.update(tasks[modality], completed=n)

        if add:
            assert target is not None  # checked above
            manifest = add_to_index(target, ss, renumber=renumber, progress=progress, wait=wait, on_message=note)
            out_dir = target
        else:
            cfg = BuildConfig(
                index_type=index_type.value,
                use_gpu=gpu,
                max_memory=parse_memory(max_memory) if max_memory else None,
                on_disk=on_disk,
                target_recall=target_recall,
                k=k,
                querybank=querybank,
            )
            assert out_dir is not None  # checked above
            manifest = build_index(ss, out_dir, cfg, progress=progress, wait=wait, on_message=note)
    if onnx:
        _export_onnx(out_dir, wait)
    if as_json:
        out.print_json(json.dumps(manifest.to_dict()))
        return
    for m in manifest.indexes.values():
        where = " (lists on disk)" if m.ivfdata_file else ""
        out.print(
            f"{m.modality} index: {m.count} vectors, {m.factory}{where} {m.search_params or ''} on {m.built_on} in {m.build_seconds:.1f}s"
        )
        if m.extra.get("querybank"):
            other = "captions" if m.modality == "image" else "images"
            out.print(
                f"  querybank: tau {m.extra['querybank']['tau']}, a bias per row from the model's training {other}"
            )
        t = m.extra.get("tuning")
        if t and not add:
            line = f"  tuned: recall@{t['k']} {t['recall']:.3f} at {t['qps']:.0f} queries/s ({t['queries']} sample queries)"
            if t["reached"]:
                out.print(line)
            else:
                err.print(
                    f"[yellow]{line}: target {t['target']} not reached; kept the best setting found.[/yellow]",
                    highlight=False,
                )
    out.print(f"{'Updated' if add else 'Wrote'} {out_dir}")


def _merge(target: Path | None, wait: bool, as_json: bool) -> None:
    from retriever.indexes.partitioned import merge_parts

    if target is None:
        raise UserError("Name the index to merge: retriever index merge INDEX.")
    manifest = merge_parts(target, wait=wait, on_message=note)
    if as_json:
        out.print_json(json.dumps(manifest.to_dict()))
        return
    for m in manifest.indexes.values():
        out.print(
            f"{m.modality} index: {m.count} vectors, {m.factory} (lists on disk), merged from {m.extra['built_in_parts']} parts"
        )
    out.print(f"Wrote {target}")


def _build_part(shards, out_dir, part, index_type, max_memory, target_recall, add, as_json, querybank) -> None:
    from retriever.indexes.memory import parse_memory
    from retriever.indexes.partitioned import build_part, parse_part, staging_dir

    if out_dir is None or add:
        raise UserError(
            "--part takes the shard folder and the final index folder: retriever index SHARDS --out INDEX --part I/N."
        )
    i, n = parse_part(part)
    cfg = BuildConfig(
        index_type=index_type.value,
        max_memory=parse_memory(max_memory) if max_memory else None,
        on_disk=True,
        target_recall=target_recall,
        querybank=querybank,
    )
    with err.status(f"Indexing part {i} of {n}…"):
        result = build_part(shards, out_dir, i, n, cfg)
    if as_json:
        out.print_json(json.dumps(result))
        return
    counts = ", ".join(f"{m}: {e['count']} vectors" for m, e in result["entries"].items())
    out.print(
        f"Part {i} of {n} (shards {result['shards'][0]}–{result['shards'][1]}) done in {staging_dir(out_dir)}: {counts}."
    )


def _export_onnx(index_dir: Path, wait: bool) -> None:
    """ONNX towers beside the index, so `search` needs no torch; a failure costs one line, not the index.

    The export is written into the index folder, so it holds the index's writer lock: an `--add`
    swapping the folder meanwhile would otherwise drop it or mix it in."""
    from retriever.locks import folder_lock
    from retriever.onnx.export import export_for_index

    try:
        with (
            folder_lock(index_dir, inside=False, wait=wait, on_wait=note),
            err.status("Exporting the model to ONNX for torch-free queries…"),
        ):
            folder, written = export_for_index(index_dir)
    except UserError as e:
        err.print(f"[yellow]No ONNX export ({e}); queries will use torch.[/yellow]", highlight=False)
        return
    if written:
        err.print(f"Exported the model to {folder} (verified against torch); queries need no torch.", highlight=False)
