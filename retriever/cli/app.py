"""The `retriever` command: a thin Typer layer over the library."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from retriever.errors import UserError

# transformers' load reports and hub progress bars are noise on our console; users can override.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    help="Contrastive cross-modal retrieval: embed image collections, index them, search by text or image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
# Piped output has no terminal width; 80 columns would truncate the tables' cells.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


class Modality(str, Enum):
    image = "image"
    text = "text"


class IndexType(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"
    ivfpq = "ivfpq"
    opq = "opq"


def user_errors(fn):
    """Turn a UserError into one red sentence and exit status 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs chatty warnings on the root logger
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[red]Error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("Interrupted; rerun the same command to resume.")
            raise typer.Exit(130) from None

    return wrapper


ModelOpt = typer.Option(
    None, "--model", "-m", help="open_clip model name (default ViT-B-32), a model-config JSON, or local-dir:FOLDER."
)
PretrainedOpt = typer.Option(
    None,
    "--pretrained",
    "-p",
    help="Pretrained tag (default laion2b_s34b_b79k for ViT-B-32), a weights file, or 'random'.",
)
DeviceOpt = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available).")
PrecisionOpt = typer.Option(None, "--precision", help="fp32 (CPU), fp16 or bf16 (GPU; default fp16 there).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
WorkersOpt = typer.Option(
    None,
    help="Image-decoding worker processes (default: cores - 2, at most 4, on a CPU-only machine; 0 decodes in the main process).",
)


def _workers(n: int | None) -> int:
    from retriever.data.loading import default_workers

    return default_workers() if n is None else n


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and os.environ.get("RETRIEVER_PROGRESS") != "1",
    )


def _load(model: str | None, pretrained: str | None, device=None, precision=None):
    from retriever.models.load import DEFAULT_MODEL, load_model

    with err.status(f"Loading model {model or DEFAULT_MODEL}…"):
        return load_model(model or DEFAULT_MODEL, pretrained, device=device, precision=precision)


@app.command()
@user_errors
def embed(
    source: Path = typer.Argument(
        ..., help="Folder of images (captions from same-name .txt) or a CSV/TSV/JSONL/Parquet manifest."
    ),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder for the Parquet shards."),
    model: str | None = ModelOpt,
    pretrained: str | None = PretrainedOpt,
    image_column: str | None = typer.Option(None, help="Manifest column with image paths (default: image, path, ...)."),
    caption_column: str | None = typer.Option(
        None, help="Manifest column with captions (default: caption, text, ...)."
    ),
    batch_size: int = typer.Option(32, help="Images per model forward."),
    shard_size: int = typer.Option(10_000, help="Rows per Parquet shard (the unit of resumption)."),
    workers: int | None = WorkersOpt,
    dtype: str = typer.Option("float32", help="Embedding storage type: float32 or float16."),
    device: str | None = DeviceOpt,
    precision: str | None = PrecisionOpt,
    overwrite: bool = typer.Option(False, help="Replace shards in --out made with other arguments."),
    as_json: bool = JsonOpt,
):
    """Embed a collection into Parquet shards (resumes an interrupted run)."""
    from retriever.data.sources import read_source
    from retriever.embed import EmbedConfig, embed_items

    items = read_source(source, image_column=image_column, caption_column=caption_column)
    encoder = _load(model, pretrained, device, precision)
    cfg = EmbedConfig(
        shard_size=shard_size, batch_size=batch_size, num_workers=_workers(workers), dtype=dtype, overwrite=overwrite
    )
    with _progress() as bar:
        task = bar.add_task("Embedding", total=None)
        result = embed_items(
            items, encoder, out_dir, cfg, progress=lambda n, total: bar.update(task, completed=n, total=total)
        )
    if as_json:
        out.print_json(json.dumps(result.__dict__))
        return
    out.print(
        f"{result.rows} rows in {result.shards} shards at {result.out_dir} "
        f"({result.shards_written} written, {result.shards_resumed} kept from an earlier run; "
        f"{result.images_per_second:.1f} images/s)."
    )
    if result.errors:
        err.print(f"[yellow]Skipped {result.errors} unreadable image(s)[/yellow]; details in {result.errors_file}:")
        for e in result.error_samples:
            err.print(f"  {e['path']}: {e['reason']}", highlight=False)


@app.command()
@user_errors
def index(
    shards: Path = typer.Argument(..., help="Shard folder written by `retriever embed` (with --add: the new shards)."),
    target: Path | None = typer.Argument(None, help="With --add: the existing index folder to extend."),
    out_dir: Path | None = typer.Option(None, "--out", "-o", help="Index folder to write (replaced atomically)."),
    index_type: IndexType = typer.Option(
        IndexType.auto,
        help="auto: chosen from N, d and --max-memory; flat, hnsw, ivf (IVF-Flat), ivfpq (IVF-PQ + exact re-rank), opq (OPQ + IVF-HNSW + PQ + re-rank).",
    ),
    max_memory: str | None = typer.Option(
        None, "--max-memory", help="RAM budget for the index, e.g. 4G or 512M (default: no limit)."
    ),
    target_recall: float | None = typer.Option(
        None, "--target-recall", help="Tune search parameters to reach this recall@k against exact search, e.g. 0.95."
    ),
    k: int = typer.Option(10, "--k", help="The k of recall@k for --target-recall."),
    on_disk: bool = typer.Option(
        False, "--on-disk", help="Keep IVF inverted lists on disk (memory-mapped) even when RAM would hold them."
    ),
    add: bool = typer.Option(False, "--add", help="Append SHARDS to the index TARGET without retraining."),
    renumber: bool = typer.Option(
        False,
        "--renumber",
        help="With --add: shift new ids past the index's largest id instead of refusing clashing ids.",
    ),
    gpu: bool | None = typer.Option(None, "--gpu/--no-gpu", help="Build on the GPU (default: when faiss sees one)."),
    as_json: bool = JsonOpt,
):
    """Build FAISS indexes (image, and text where captions exist) from shards, or --add shards to one."""
    from retriever.indexes import BuildConfig, build_index
    from retriever.indexes.add import add_to_index
    from retriever.indexes.memory import parse_memory
    from retriever.shards import ShardSet

    if add:
        if target is None or out_dir is not None:
            raise UserError(
                "--add takes the new shard folder and the index folder: retriever index --add NEW_SHARDS INDEX."
            )
        if target_recall is not None or max_memory is not None or index_type != IndexType.auto:
            raise UserError("--add keeps the index's type and tuned parameters; rebuild to change them.")
    elif out_dir is None:
        raise UserError("Give the index folder to write with --out (or use --add NEW_SHARDS INDEX).")
    elif target is not None:
        raise UserError(f"Unexpected second folder {target}; did you mean --add?")
    ss = ShardSet(shards)
    with _progress() as bar:
        tasks: dict[str, int] = {}

        def progress(modality, n, total):
            if modality not in tasks:
                tasks[modality] = bar.add_task(f"Indexing {modality}", total=total)
            bar.update(tasks[modality], completed=n)

        if add:
            manifest = add_to_index(target, ss, renumber=renumber, progress=progress)
            out_dir = target
        else:
            cfg = BuildConfig(
                index_type=index_type.value,
                use_gpu=gpu,
                max_memory=parse_memory(max_memory) if max_memory else None,
                on_disk=on_disk,
                target_recall=target_recall,
                k=k,
            )
            manifest = build_index(ss, out_dir, cfg, progress=progress)
    if as_json:
        out.print_json(json.dumps(manifest.to_dict()))
        return
    for m in manifest.indexes.values():
        where = " (lists on disk)" if m.ivfdata_file else ""
        out.print(
            f"{m.modality} index: {m.count} vectors, {m.factory}{where} {m.search_params or ''} on {m.built_on} in {m.build_seconds:.1f}s"
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


@app.command()
@user_errors
def search(
    index_dir: Path = typer.Argument(..., help="Index folder written by `retriever index`."),
    query: str | None = typer.Argument(None, help="Text query (or use --image)."),
    image: Path | None = typer.Option(None, "--image", "-i", help="Query image file."),
    modality: Modality = typer.Option(Modality.image, help="What to retrieve: image (default) or text (captions)."),
    k: int = typer.Option(10, "-k", help="Number of results."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to encode the query (default: the one named in the index)."
    ),
    pretrained: str | None = PretrainedOpt,
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
):
    """Search an index: text → image, image → text, image → image."""
    from retriever.search import Retriever

    if (query is None) == (image is None):
        raise UserError("Give a text query or --image PATH (exactly one).")
    if image is not None and not image.is_file():
        raise UserError(f"Query image {image} does not exist.")
    encoder = _load(model, pretrained, device) if model else None
    r = Retriever(index_dir, encoder, device=device)
    if encoder is None:
        with err.status("Loading model…"):
            r.model  # noqa: B018 (loads the model inside the spinner)
    results = r.search(text=query, image=image, k=k, modality=modality.value)
    if as_json:
        out.print_json(json.dumps([x.to_dict() for x in results]))
        return
    table = Table("rank", "score", "id", "caption", "path", title=f"{modality.value} results for {query or image}")
    for x in results:
        table.add_row(str(x.rank), f"{x.score:.4f}", str(x.id), x.caption or "", x.path)
    out.print(table)


@app.command()
@user_errors
def info(
    path: Path = typer.Argument(..., help="A shard folder or an index folder."),
    as_json: bool = JsonOpt,
):
    """Describe shards or an index: model, counts, index types and search parameters."""
    from retriever.info import describe, to_json

    d = describe(path)
    if as_json:
        out.print_json(to_json(d))
        return
    table = Table("field", "value", title=f"{d['kind']}: {d['path']}", show_header=False)
    model = d["model"]
    table.add_row("model", f"{model['name']} ({model.get('pretrained') or 'no pretrained tag'})")
    table.add_row("weights sha256", model["weights_sha256"])
    table.add_row("embedding dim", str(model["embed_dim"]))
    if d["kind"] == "shards":
        for key in (
            "rows",
            "rows_with_caption",
            "shards",
            "bytes",
            "dtype",
            "normalized",
            "skipped_images",
            "errors_file",
        ):
            table.add_row(key, str(d[key]))
    else:
        table.add_row("bytes", str(d["bytes"]))
        table.add_row(
            "shards", f"{d['shards']['folder']} ({d['shards']['rows']} rows, {len(d['shards']['files'])} files)"
        )
        for a in d["shards"].get("added", []):
            table.add_row("  added", f"{a['folder']} ({a['rows']} rows, ids shifted by {a['id_offset']})")
        for name, m in d["indexes"].items():
            params = ", ".join(f"{k}={v}" for k, v in m["search_params"].items()) or "exact"
            table.add_row(f"{name} index", f"{m['count']} vectors, {m['factory']} ({params}), built on {m['built_on']}")
            if m.get("ivfdata_file"):
                table.add_row("  inverted lists", f"on disk, memory-mapped ({m['ivfdata_file']})")
            if m.get("rerank") == "mmap":
                table.add_row("  re-ranking", f"exact, vectors read from disk ({', '.join(m['vectors_files'])})")
            for key, value in m.get("extra", {}).items():
                if key == "tuning":
                    t = value
                    status = "reached" if t["reached"] else "NOT reached (best setting kept)"
                    params = ", ".join(f"{a}={b}" for a, b in t["params"].items()) or "exact"
                    table.add_row(
                        "  tuning",
                        f"target recall@{t['k']} {t['target']} {status}: {params} → recall {t['recall']:.4f}, "
                        f"{t['qps']:.0f} queries/s ({t['latency_ms']:.2f} ms/query batched, {t['queries']} queries, "
                        f"{len(t['tried'])} settings tried)"
                        + (f"; tuned at {t['tuned_at_count']} vectors" if "tuned_at_count" in t else ""),
                    )
                elif key.endswith("_bytes"):
                    from retriever.indexes.memory import format_bytes

                    table.add_row(f"  {key[:-6].replace('_', ' ')}", format_bytes(value))
                else:
                    table.add_row(f"  {key}", json.dumps(value) if not isinstance(value, str) else value)
    out.print(table)


class Loss(str, Enum):
    infonce = "infonce"
    siglip = "siglip"


@app.command()
@user_errors
def train(
    source: Path = typer.Argument(
        ..., help="Training pairs: a folder (captions in same-name .txt) or a CSV/TSV/JSONL/Parquet manifest."
    ),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Run folder: best/ (the model to use), last/ (for --resume), metrics.json."
    ),
    val: Path | None = typer.Option(None, help="Validation source (default: a seeded --val-fraction of SOURCE)."),
    test: Path | None = typer.Option(None, help="Test source, evaluated once with the best model at the end."),
    val_fraction: float = typer.Option(
        0.1, help="Share of SOURCE's images held out for validation when --val is not given."
    ),
    test_fraction: float = typer.Option(
        0.0, help="Share of SOURCE's images held out for the final test when --test is not given."
    ),
    split_seed: int = typer.Option(0, help="Seed of the train/val/test split."),
    model: str | None = ModelOpt,
    pretrained: str | None = PretrainedOpt,
    image_tower: str | None = typer.Option(
        None,
        help="Compose a model: timm:NAME image tower (with --image-weights, or the packaged EfficientNet-Lite0 for timm:tf_efficientnet_lite0).",
    ),
    text_tower: str | None = typer.Option(None, help="Compose a model: hf:FOLDER, a local transformers text model."),
    image_weights: Path | None = typer.Option(None, help="Local weights file for the timm image tower."),
    embed_dim: int = typer.Option(512, help="Shared embedding size of a composed model's projection heads."),
    image_column: str | None = typer.Option(None, help="Manifest column with image paths."),
    caption_column: str | None = typer.Option(
        None, help="Manifest column with captions (a list column gives several)."
    ),
    epochs: int = typer.Option(10, help="Passes over the training images (one caption drawn per image each time)."),
    batch_size: int = typer.Option(64, help="Pairs per contrastive batch (over all processes): each pair's negatives."),
    micro_batch: int | None = typer.Option(
        None, help="GradCache chunk (per process): the exact --batch-size loss with one chunk's activations in memory."
    ),
    lr: float = typer.Option(5e-5, help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay (not applied to gains, biases, temperature)."),
    warmup: float = typer.Option(
        0.05, help="Linear warm-up: a fraction of all steps (< 1) or a number of steps; then cosine."
    ),
    grad_clip: float = typer.Option(1.0, help="Clip the global gradient norm (0: off)."),
    loss: Loss = typer.Option(
        Loss.infonce, help="infonce (CLIP's symmetric softmax) or siglip (sigmoid, learnable bias)."
    ),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="open_clip's random-crop train transform."),
    lock_image: bool = typer.Option(False, help="Freeze the image tower."),
    unlock_image_last: int = typer.Option(
        0,
        help="With --lock-image: keep the last N layer groups trainable (open_clip groups; in a native ViT the projection is the last group).",
    ),
    lock_text: bool = typer.Option(False, help="Freeze the text tower."),
    unlock_text_last: int = typer.Option(
        0,
        help="With --lock-text: keep the last N layers trainable (in a native text tower the projection counts as one).",
    ),
    cache_features: bool = typer.Option(
        False, help="Both towers locked: compute tower outputs once, train heads + temperature on the cache."
    ),
    grad_checkpointing: bool = typer.Option(False, help="Recompute activations in backward: less memory, ~30% slower."),
    device: str | None = DeviceOpt,
    precision: str | None = PrecisionOpt,
    seed: int = typer.Option(0, help="Seed of shuffling, caption choice, augmentation and dropout."),
    workers: int | None = WorkersOpt,
    logdir: Path | None = typer.Option(None, help="Write TensorBoard logs here."),
    resume: bool = typer.Option(False, help="Continue the run in --out exactly where it stopped."),
    save_every: int = typer.Option(0, help="Also checkpoint last/ every N steps (0: at epoch ends)."),
    max_steps: int | None = typer.Option(None, help="Stop after N steps in total (resumable)."),
    as_json: bool = JsonOpt,
):
    """Fine-tune a dual encoder with InfoNCE; the best model by val recall lands in RUN_DIR/best/."""
    from retriever.training.loop import TrainConfig
    from retriever.training.loop import train as run_training
    from retriever.training.optim import OptimConfig

    cfg = TrainConfig(
        source=str(source),
        out=str(out_dir),
        val=_str(val),
        test=_str(test),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        split_seed=split_seed,
        image_column=image_column,
        caption_column=caption_column,
        model=model,
        pretrained=pretrained,
        image_tower=image_tower,
        text_tower=text_tower,
        image_weights=_str(image_weights),
        embed_dim=embed_dim,
        epochs=epochs,
        batch_size=batch_size,
        micro_batch=micro_batch,
        loss=loss.value,
        augment=augment,
        lock_image=lock_image,
        unlock_image_last=unlock_image_last,
        lock_text=lock_text,
        unlock_text_last=unlock_text_last,
        cache_features=cache_features,
        grad_checkpointing=grad_checkpointing,
        precision=precision,
        device=device,
        seed=seed,
        workers=_workers(workers),
        logdir=_str(logdir),
        resume=resume,
        save_every=save_every,
        max_steps=max_steps,
        optim=OptimConfig(lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip or None),
    )
    from retriever.cli.render import TrainDisplay

    try:
        with TrainDisplay(err, enabled=err.is_terminal or os.environ.get("RETRIEVER_PROGRESS") == "1") as display:
            result = run_training(cfg, display.callbacks())
    except KeyboardInterrupt:
        err.print(
            f"Interrupted; add --resume to the same command to continue from the last save in {out_dir / 'last'}."
        )
        raise typer.Exit(130) from None
    if as_json:
        out.print_json(json.dumps(result.__dict__))
        return
    out.print(TrainDisplay.history_table(result))
    out.print(
        f"Best model (epoch {result.best_epoch}): {result.best_dir}  — use it as --model local-dir:{result.best_dir}"
    )


@app.command(name="eval")
@user_errors
def eval_cmd(
    model: str = typer.Argument(..., help="Model: local-dir:FOLDER (e.g. RUN_DIR/best), a hub name, or a config JSON."),
    source: Path = typer.Argument(..., help="Image–caption pairs: a folder with .txt captions or a manifest."),
    pretrained: str | None = PretrainedOpt,
    image_column: str | None = typer.Option(None, help="Manifest column with image paths."),
    caption_column: str | None = typer.Option(None, help="Manifest column with captions."),
    batch_size: int = typer.Option(64, help="Images per model forward."),
    workers: int | None = WorkersOpt,
    device: str | None = DeviceOpt,
    precision: str | None = PrecisionOpt,
    as_json: bool = JsonOpt,
):
    """Recall@1/5/10 and mean/median rank, text→image and image→text, of MODEL on SOURCE."""
    from retriever.cli.render import recall_table
    from retriever.data.sources import read_source
    from retriever.evaluation import evaluate

    items = read_source(source, image_column=image_column, caption_column=caption_column)
    encoder = _load(model, pretrained, device, precision)
    with _progress() as bar:
        task = bar.add_task("Encoding", total=len(items))
        result = evaluate(
            encoder,
            items,
            batch_size=batch_size,
            workers=_workers(workers),
            progress=lambda n, t: bar.update(task, completed=n, total=t),
        )
    if as_json:
        out.print_json(json.dumps({"model": encoder.identity.to_dict(), **result.to_dict()}))
        return
    out.print(recall_table(result.metrics, f"{encoder.identity.describe()} on {source}"))
    if result.skipped:
        err.print(
            f"[yellow]Skipped {len(result.skipped)} unreadable image(s)[/yellow], e.g. {result.skipped[0]}",
            highlight=False,
        )


@app.command()
@user_errors
def demo(
    workspace: Path = typer.Option(
        Path("retriever-demo"), help="Folder for data, model, shards, index and report (a rerun reuses them)."
    ),
    limit: int | None = typer.Option(None, help="Use only N emoji (a quick, reduced demo)."),
    epochs: int = typer.Option(30, help="Fine-tuning epochs (heads and temperature on cached tower outputs)."),
    unlock_text_last: int = typer.Option(
        0, help="Also tune the last N MiniLM layers (end to end; much slower on CPU)."
    ),
    unlock_image_last: int = typer.Option(
        0, help="Also tune the last N EfficientNet blocks (end to end; much slower on CPU)."
    ),
    seed: int = typer.Option(0, help="Seed of the concept split and the training."),
    workers: int | None = WorkersOpt,
    as_json: bool = JsonOpt,
):
    """Offline end to end on Twemoji: compose the default model, fine-tune, report held-out recall, index, query."""
    from retriever.cli.render import TrainDisplay
    from retriever.demo.report import print_report
    from retriever.demo.run import DemoConfig, run_demo

    cfg = DemoConfig(
        workspace=str(workspace),
        limit=limit,
        epochs=epochs,
        seed=seed,
        workers=_workers(workers),
        unlock_text_last=unlock_text_last,
        unlock_image_last=unlock_image_last,
    )
    show = err.is_terminal or os.environ.get("RETRIEVER_PROGRESS") == "1"
    with TrainDisplay(err, enabled=show) as display, _progress() as bar:
        task = bar.add_task("Embedding", total=None, visible=False)
        result = run_demo(
            cfg,
            display.callbacks(),
            status=display.on_status,
            embed_progress=lambda n, t: bar.update(task, completed=n, total=t, visible=True),
        )
    if as_json:
        out.print_json(json.dumps(result.__dict__))
        return
    print_report(out, result)


def _str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
