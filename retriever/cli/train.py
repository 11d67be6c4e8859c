"""`retriever train`: fine-tune a dual encoder."""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import typer

from retriever.cli.common import (
    DeviceOpt,
    JsonOpt,
    Loss,
    ModelOpt,
    PrecisionOpt,
    PretrainedOpt,
    WorkersOpt,
    config_from_options,
    err,
    out,
    print_skipped,
    user_errors,
    workers_or_default,
)
from retriever.training.config import OptimConfig, TrainConfig

# Option defaults are the library's: one source of truth (training/config.py is torch-free).
TRAIN = TrainConfig(source="", out="")
OPTIM = TRAIN.optim


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
        TRAIN.val_fraction, help="Share of SOURCE's images held out for validation when --val is not given."
    ),
    test_fraction: float = typer.Option(
        TRAIN.test_fraction, help="Share of SOURCE's images held out for the final test when --test is not given."
    ),
    split_seed: int = typer.Option(TRAIN.split_seed, help="Seed of the train/val/test split."),
    model: str | None = ModelOpt,
    pretrained: str | None = PretrainedOpt,
    image_tower: str | None = typer.Option(
        None,
        help="Compose a model: timm:NAME image tower (with --image-weights, or the packaged EfficientNet-Lite0 for timm:tf_efficientnet_lite0).",
    ),
    text_tower: str | None = typer.Option(None, help="Compose a model: hf:FOLDER, a local transformers text model."),
    image_weights: Path | None = typer.Option(None, help="Local weights file for the timm image tower."),
    embed_dim: int = typer.Option(
        TRAIN.embed_dim, help="Shared embedding size of a composed model's projection heads."
    ),
    image_column: str | None = typer.Option(None, help="Manifest column with image paths."),
    caption_column: str | None = typer.Option(
        None, help="Manifest column with captions (a list column gives several)."
    ),
    epochs: int = typer.Option(
        TRAIN.epochs, help="Passes over the training images (one caption drawn per image each time)."
    ),
    batch_size: int = typer.Option(
        TRAIN.batch_size, help="Pairs per contrastive batch (over all processes): each pair's negatives."
    ),
    micro_batch: int | None = typer.Option(
        None, help="GradCache chunk (per process): the exact --batch-size loss with one chunk's activations in memory."
    ),
    lr: float = typer.Option(OPTIM.lr, help="Peak learning rate (AdamW)."),
    weight_decay: float = typer.Option(
        OPTIM.weight_decay, help="AdamW weight decay (not applied to gains, biases, temperature)."
    ),
    warmup: float = typer.Option(
        OPTIM.warmup, help="Linear warm-up: a fraction of all steps (< 1) or a number of steps; then cosine."
    ),
    grad_clip: float = typer.Option(OPTIM.grad_clip, help="Clip the global gradient norm (0: off)."),
    loss: Loss = typer.Option(
        Loss(TRAIN.loss), metavar="NAME", help="infonce (CLIP's symmetric softmax) or siglip (sigmoid, learnable bias)."
    ),
    no_augment: bool = typer.Option(
        not TRAIN.augment, "--no-augment", help="Turn off open_clip's random-crop train transform."
    ),
    lock_image: bool = typer.Option(TRAIN.lock_image, "--lock-image", help="Freeze the image tower."),
    unlock_image_last: int = typer.Option(
        TRAIN.unlock_image_last,
        help="With --lock-image: keep the last N layer groups trainable (open_clip groups; in a native ViT the projection is the last group).",
    ),
    lock_text: bool = typer.Option(TRAIN.lock_text, "--lock-text", help="Freeze the text tower."),
    unlock_text_last: int = typer.Option(
        TRAIN.unlock_text_last,
        help="With --lock-text: keep the last N layers trainable (in a native text tower the projection counts as one).",
    ),
    cache_features: bool = typer.Option(
        TRAIN.cache_features,
        "--cache-features",
        help="Both towers locked: compute tower outputs once, train heads + temperature on the cache "
        "(with --unlock-image-last N on an EfficientNet tower: cache the maps below those blocks and train them too).",
    ),
    cache_views: int = typer.Option(
        TRAIN.cache_views,
        help="With --cache-features: tower passes per training image (the plain view + N-1 seeded zoom/shift views).",
    ),
    feature_cache: Path | None = typer.Option(
        None,
        help="With --cache-features: keep tower outputs here instead of RUN_DIR/features; runs sharing "
        "a folder reuse each other's rows for unchanged images and captions.",
    ),
    caption_template: list[str] = typer.Option(
        [], help='Also train on every caption under this template, e.g. "an icon of {}" (repeatable).'
    ),
    querybank: str = typer.Option(
        TRAIN.querybank,
        help="Querybank normalisation of cross-modal search: auto (bank of training queries in best/, "
        "temperature chosen on validation, or none), off, or a fixed temperature such as 0.1.",
    ),
    grad_checkpointing: bool = typer.Option(
        TRAIN.grad_checkpointing,
        "--grad-checkpointing",
        help="Recompute activations in backward: less memory, ~30% slower.",
    ),
    device: str | None = DeviceOpt,
    precision: str | None = PrecisionOpt,
    seed: int = typer.Option(TRAIN.seed, help="Seed of shuffling, caption choice, augmentation and dropout."),
    workers: int | None = WorkersOpt,
    logdir: Path | None = typer.Option(None, help="Write TensorBoard logs here."),
    resume: bool = typer.Option(TRAIN.resume, "--resume", help="Continue the run in --out exactly where it stopped."),
    save_every: int = typer.Option(TRAIN.save_every, help="Also checkpoint last/ every N steps (0: at epoch ends)."),
    max_steps: int | None = typer.Option(None, help="Stop after N steps in total (resumable)."),
    as_json: bool = JsonOpt,
):
    """Fine-tune a dual encoder with InfoNCE; the best model by val recall lands in RUN_DIR/best/."""
    options = dict(locals())  # the flags are TrainConfig's and OptimConfig's fields
    from retriever.training.loop import train as run_training

    cfg = config_from_options(
        TrainConfig,
        options,
        out=str(out_dir),
        augment=not no_augment,
        caption_templates=list(caption_template),
        workers=workers_or_default(workers),
        optim=config_from_options(OptimConfig, options, grad_clip=grad_clip or None),
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
        out.print_json(json.dumps(asdict(result)))
        return
    out.print(TrainDisplay.history_table(result))
    print_skipped(result.skipped)
    out.print(
        f"Best model (epoch {result.best_epoch}): {result.best_dir}  — use it as --model local-dir:{result.best_dir}"
    )
