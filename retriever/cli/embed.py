"""`retriever embed`: a collection into Parquet shards."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retriever.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    WaitOpt,
    WorkersOpt,
    err,
    load_encoder,
    note,
    out,
    print_skipped,
    progress_bar,
    user_errors,
    workers_or_default,
)
from retriever.embed_config import EmbedConfig

# Option defaults are the library's: one source of truth (embed_config.py is torch-free). The
# worker count's default needs torch (is there a GPU?), so --workers keeps None for "the default".
EMBED = EmbedConfig(num_workers=0)


@user_errors
def embed(
    source: Path = typer.Argument(
        ...,
        help="Folder of images (captions from same-name .txt), a CSV/TSV/JSONL/Parquet manifest, webdataset tar "
        "shards (a .tar, a glob, shards/{00000..00099}.tar or a folder of tars) or image Parquet (img2dataset, HF).",
    ),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the Parquet shards."),
    model: str | None = ModelOpt,
    pretrained: str | None = PretrainedOpt,
    image_column: str | None = typer.Option(None, help="Manifest column with image paths (default: image, path, ...)."),
    caption_column: str | None = typer.Option(
        None, help="Manifest column with captions (default: caption, text, ...)."
    ),
    batch_size: int = typer.Option(EMBED.batch_size, help="Images per model forward."),
    shard_size: int = typer.Option(EMBED.shard_size, help="Rows per Parquet shard (the unit of resumption)."),
    workers: int | None = WorkersOpt,
    dtype: str = typer.Option(EMBED.dtype, help="Embedding storage type: float32 or float16."),
    device: str | None = DeviceOpt,
    precision: str | None = PrecisionOpt,
    overwrite: bool = typer.Option(EMBED.overwrite, help="Replace shards in --out made with other arguments."),
    max_pixels: int | None = typer.Option(
        EMBED.max_pixels,
        "--max-pixels",
        help="Skip (and report) images that decode to more pixels than this (0: no limit but Pillow's own); "
        "JPEGs are decoded scaled down first. Bounds each decode worker's memory.",
    ),
    wait: bool = WaitOpt,
    num_parts: int = typer.Option(
        EMBED.num_parts,
        "--num-parts",
        help="Split the work into this many independent parts (SLURM arrays, several machines).",
    ),
    part: int = typer.Option(
        EMBED.part, "--part", help="Which part (0-based) this run writes; under torchrun: the rank."
    ),
    as_json: bool = JsonOpt,
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="Forward passes on onnx (onnxruntime, CPU fp32), torch, or auto (the faster, measured on one batch).",
    ),
):
    """Embed a collection into Parquet shards (resumes an interrupted run)."""
    from retriever.data.sources import read_source
    from retriever.embed import embed_items
    from retriever.embed_parallel import part_from_environment

    num_parts, part, device, dist_info = part_from_environment(num_parts, part, device)
    items = read_source(source, image_column=image_column, caption_column=caption_column)
    encoder = load_encoder(model, pretrained, device, precision)
    cfg = EmbedConfig(
        shard_size=shard_size,
        batch_size=batch_size,
        num_workers=workers_or_default(workers),
        dtype=dtype,
        overwrite=overwrite,
        max_pixels=max_pixels or None,
        num_parts=num_parts,
        part=part,
    )
    from retriever.onnx.backend import choose_embed_backend

    with err.status("Choosing the embedding backend…"):
        onnx, why = choose_embed_backend(encoder, backend, batch_size, len(items))
    if why:
        err.print(why, highlight=False)
    with progress_bar() as bar:
        task = bar.add_task("Embedding", total=None)
        result = embed_items(
            items,
            encoder,
            out_dir,
            cfg,
            progress=lambda n, total: bar.update(task, completed=n, total=total),
            wait=wait,
            on_message=note,
            skipped=getattr(items, "skipped", ()),
            onnx=onnx,
        )
    from retriever.embed_parallel import finish_parts

    status = finish_parts(out_dir, dist_info)
    if not dist_info.is_main:
        return  # rank 0 reports for the whole torchrun job
    if dist_info.enabled and status is not None:  # after the barrier every rank's shards are on disk
        import dataclasses

        from retriever.embed import count_rows

        result = dataclasses.replace(result, rows=count_rows(out_dir.expanduser()), shards=status["shards"])
    not_images = getattr(items, "not_images", 0)  # a folder's files that are not an image type
    if as_json:
        out.print_json(
            json.dumps(
                {
                    **result.__dict__,
                    "skipped": result.skipped.to_dict(),
                    "not_images": not_images,
                    "parts": status,
                }
            )
        )
        return
    which = f"part {part} of {num_parts}: " if num_parts > 1 and not dist_info.enabled else ""
    out.print(
        f"{which}{result.rows} rows in {result.shards} shards at {result.out_dir} "
        f"({result.shards_written} written, {result.shards_resumed} kept from an earlier run; "
        f"{result.images_per_second:.1f} images/s)."
    )
    if status is not None:
        done = len(status["complete"])
        out.print(
            f"Parts complete: {done} of {status['num_parts']}"
            + (
                "."
                if done == status["num_parts"]
                else f" (not yet: {', '.join(str(p) for p in range(status['num_parts']) if p not in status['complete'])})."
            )
        )
    if not_images:
        err.print(f"{not_images} file(s) in the source are not an image type and were left aside.")
    if result.truncated_captions:
        err.print(
            f"[yellow]{result.truncated_captions} caption(s) are longer than the model's {result.text_context}-token "
            "context[/yellow]; they were embedded from their first tokens only.",
            highlight=False,
        )
    print_skipped(result.skipped)
