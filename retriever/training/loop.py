"""`retriever train`: fine-tune an open_clip dual encoder on image–caption pairs with InfoNCE.

The classic loop: evaluate the starting model on val, then per epoch train with a progress
callback → evaluate on val → keep the best by mean recall → save; report on test at the end.

RUN_DIR layout (every model folder is an open_clip `local-dir:` folder, see checkpoint.py):
    run.json       the configuration (a `--resume` must match it)
    init/          the composed starting model (only with --image-tower/--text-tower)
    last/          latest weights + train_state.pt (optimizer, step, RNG, data position)
    best/          best weights by val mean recall, with metrics.json: the stable path to use
    metrics.json   per-epoch history and, at the end, test metrics
    features/      cached tower outputs (--cache-features)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from retriever.atomic import clean_stale_in, write_json_atomic
from retriever.data.sources import SourceItem, read_source
from retriever.errors import ConfigError, UserError
from retriever.locks import folder_lock
from retriever.metrics import RetrievalMetrics
from retriever.models.load import LoadedModel, load_model, resolve_device, resolve_precision
from retriever.skipped import ERRORS_FILE, SkippedImages, skipped_entry, write_skipped
from retriever.training import distributed
from retriever.training.checkpoint import load_train_state, rng_state, save_checkpoint, set_rng_state
from retriever.training.config import OptimConfig, TrainConfig
from retriever.training.data import (
    epoch_loader,
    epoch_samples,
    rank_batches,
    split_items,
    steps_per_epoch,
    with_captions,
    with_templates,
)
from retriever.training.gradcache import contrastive_backward
from retriever.training.losses import clamp_logit_scale, contrastive_loss, ensure_logit_bias
from retriever.training.optim import (
    autocast_for,
    build_optimizer,
    lr_at,
    make_scaler,
    set_lr,
    warmup_steps,
)
from retriever.training.start import build_start_model, configure_trainable, set_train_mode

log = logging.getLogger(__name__)

__all__ = ["Callbacks", "EpochInfo", "OptimConfig", "RunState", "StepInfo", "TrainConfig", "TrainResult", "train"]

# Fields that may differ between a run and its --resume without changing the result.
_RESUMABLE_CHANGES = {"resume", "workers", "logdir", "max_steps", "save_every", "eval_batch_size"}


@dataclass
class StepInfo:
    epoch: int
    step: int  # global step, after this one
    step_in_epoch: int
    steps_in_epoch: int
    loss: float
    lr: float
    temperature: float  # 1 / exp(logit_scale)
    pairs_per_second: float


@dataclass
class EpochInfo:
    epoch: int  # 0 = before training
    step: int
    train_loss: float | None
    val: dict[str, float] | None  # RetrievalMetrics.flat()
    is_best: bool
    seconds: float


@dataclass
class TrainResult:
    """Where a run's models are (run_dir, best_dir, last_dir), the best epoch and its val score,
    the per-epoch history, test metrics (with a test split), steps taken, seconds, whether
    max_steps stopped it early, and the images it skipped."""

    run_dir: str
    best_dir: str
    last_dir: str
    best_epoch: int
    best_score: float | None
    history: list[dict]
    test: dict | None
    steps: int
    seconds: float
    stopped_early: bool  # max_steps reached before the last epoch ended
    skipped: SkippedImages = field(default_factory=SkippedImages)  # undecodable images, listed in RUN_DIR/_errors.jsonl
    querybank: dict | None = None  # what fit_querybank decided for best/ ({"tau": …}); None if stopped early


@dataclass
class Callbacks:
    on_step: Callable[[StepInfo], None] | None = None
    on_epoch: Callable[[EpochInfo], None] | None = None
    on_status: Callable[[str], None] | None = None  # one-line phase messages ("caching features")
    on_progress: Callable[[str, int, int], None] | None = None  # (phase, done, total) for long phases


@dataclass
class _Splits:
    train: list[SourceItem]
    val: list[SourceItem]
    test: list[SourceItem]


def load_splits(cfg: TrainConfig) -> _Splits:
    kw: dict[str, Any] = dict(image_column=cfg.image_column, caption_column=cfg.caption_column)
    items = read_source(cfg.source, **kw)
    fractions = [0.0 if cfg.val else cfg.val_fraction, 0.0 if cfg.test else cfg.test_fraction]
    train, val, test = split_items(items, fractions, cfg.split_seed)
    if cfg.val:
        val = list(read_source(cfg.val, **kw))
    if cfg.test:
        test = list(read_source(cfg.test, **kw))
    train = with_templates(with_captions(train, "training"), cfg.caption_templates)
    return _Splits(train, [it for it in val if it.captions], [it for it in test if it.captions])


@dataclass
class RunState:
    """Everything a run changes as it goes (open_clip keeps the same in its TrainState).

    Saved with the optimiser and RNG in last/train_state.pt at every save, restored by `resume`.
    """

    step: int = 0  # optimiser steps taken
    epoch: int = 1  # the epoch in progress, or the next to start
    step_in_epoch: int = 0
    best_score: float | None = None  # best val mean recall so far
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)  # one row per evaluated epoch (0 = the start)
    epoch_losses: list[float] = field(default_factory=list)  # this epoch's step losses (kept across a resume)
    stopped: bool = False  # max_steps was reached

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
            "epoch_losses": json.dumps(self.epoch_losses),
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        return cls(
            step=int(state["step"]),
            epoch=int(state["epoch"]),
            step_in_epoch=int(state["step_in_epoch"]),
            best_score=state.get("best_score"),
            best_epoch=int(state.get("best_epoch", 0)),
            history=json.loads(state["history"]),
            epoch_losses=json.loads(state["epoch_losses"]),
        )


@dataclass
class _Run:
    """What stays fixed while a run trains: its model, optimiser, data and outputs."""

    cfg: TrainConfig
    dir: Path
    ranks: distributed.DistInfo
    callbacks: Callbacks
    encoder: LoadedModel
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    autocast: Callable
    splits: _Splits
    cached: dict | None  # tower features (cache_features)
    writer: Any  # a TensorBoard SummaryWriter on rank 0 with logdir, else None
    steps_per_epoch: int
    total_steps: int
    warmup: int
    skipped: dict[str, dict] = field(default_factory=dict)  # this rank's undecodable images, by path

    @property
    def model(self) -> Any:
        return self.encoder.model


def train(cfg: TrainConfig, callbacks: Callbacks | None = None) -> TrainResult:
    """Run (or resume) a training run into `cfg.out`.

    The run folder is locked while training (a second `train` into it is refused), and what a
    killed run left half-written (`.last.XXXX.tmp` checkpoint folders, temp files) is removed
    first and reported through `callbacks.on_status`. A run killed before its first checkpoint
    starts over, with or without `cfg.resume`.

    Args:
        cfg: what to train and how (see `TrainConfig`); `cfg.resume` continues the run in `cfg.out`
            exactly where it stopped.
        callbacks: optional progress hooks (steps, epochs, status lines), called on rank 0 only.

    Returns:
        A `TrainResult`: where the best and last models are, the per-epoch history and test metrics.
    """
    run_dir = Path(cfg.out).expanduser()
    if os.environ.get("RANK", "0") != "0" or (run_dir.exists() and not run_dir.is_dir()):
        return _train(cfg, callbacks)  # other ranks write nothing; _check_run_dir refuses a file
    if run_dir.is_dir() and _entries(run_dir) and not (run_dir / "run.json").is_file():
        raise UserError(f"--out {run_dir} is not a training run folder (no run.json); choose a new or empty folder.")
    run_dir.mkdir(parents=True, exist_ok=True)
    with folder_lock(run_dir, inside=True, what="training into"):
        for sub in (run_dir, run_dir / "features"):
            for line in clean_stale_in(sub):
                if callbacks and callbacks.on_status:
                    callbacks.on_status(line)
        return _train(cfg, callbacks)


def _train(cfg: TrainConfig, callbacks: Callbacks | None = None) -> TrainResult:
    cb = callbacks or Callbacks()
    started = time.perf_counter()
    run_dir = Path(cfg.out).expanduser()
    device = resolve_device(cfg.device)
    ranks = distributed.init_distributed(device.type)
    cfg.validate(ranks.world_size)
    if ranks.enabled and device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.precision, device)
    _check_run_dir(run_dir, cfg, ranks)

    splits = load_splits(cfg)
    if len(splits.train) < cfg.batch_size:
        raise ConfigError(
            f"batch_size {cfg.batch_size} is larger than the {len(splits.train)} training images; lower it.",
            "batch_size",
        )
    _status(cb, ranks, f"{len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test images")

    # A run killed before its first checkpoint has nothing to resume: it starts over (issue 10).
    saved = load_train_state(run_dir / "last") if cfg.resume and has_checkpoint(run_dir) else None
    encoder = build_start_model(cfg, run_dir, device, precision, ranks, resume=saved is not None)
    model = encoder.model
    if cfg.loss == "siglip":
        ensure_logit_bias(model, encoder.config)
    configure_trainable(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UserError("Nothing to train: every parameter is locked.")

    torch.manual_seed(cfg.seed + ranks.rank)  # per-rank dropout streams, as in open_clip
    optimizer = build_optimizer(model, cfg.optim)
    scaler = make_scaler(precision, device)
    spe = steps_per_epoch(len(splits.train), cfg.batch_size)
    state = RunState()
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved.get("scaler"):
            scaler.load_state_dict(saved["scaler"])
        state = RunState.from_checkpoint(saved)
        rngs = saved["rng"]
        if len(rngs) == ranks.world_size:
            set_rng_state(rngs[ranks.rank])

    writer = _tensorboard(cfg, ranks)
    cached = _cache(encoder, cfg, splits, run_dir, cb, ranks) if cfg.cache_features else None
    run = _Run(
        cfg=cfg,
        dir=run_dir,
        ranks=ranks,
        callbacks=cb,
        encoder=encoder,
        trainable=trainable,
        optimizer=optimizer,
        scaler=scaler,
        autocast=autocast_for(precision, device),
        splits=splits,
        cached=cached,
        writer=writer,
        steps_per_epoch=spe,
        total_steps=spe * cfg.epochs,
        warmup=warmup_steps(cfg.optim, spe * cfg.epochs),
    )
    for split in (cached or {}).values():
        for entry in getattr(split, "skipped", []):
            run.skipped.setdefault(entry["path"], entry)

    if saved is None:
        _evaluate_epoch(run, state, 0, None, 0.0)  # the starting point: what fine-tuning has to beat
        _save_last(run, state)
    while state.epoch <= cfg.epochs and not state.stopped:
        t_epoch = time.perf_counter()
        _train_epoch(run, state)
        if state.stopped and state.step_in_epoch < spe:
            _save_last(run, state)
            break
        losses = state.epoch_losses
        train_loss = sum(losses) / len(losses) if losses else None
        _evaluate_epoch(run, state, state.epoch, train_loss, time.perf_counter() - t_epoch)
        state.epoch, state.step_in_epoch, state.epoch_losses = state.epoch + 1, 0, []
        _save_last(run, state)

    stopped_early = state.stopped and state.epoch <= cfg.epochs
    test = querybank = None
    if not stopped_early:
        querybank = _fit_querybank(run)
    if splits.test and not stopped_early:
        test = _evaluate_folder(run_dir / "best", splits.test, cfg, device, precision, ranks, cb)
    if ranks.is_main and (test or querybank):
        summary: dict[str, Any] = {"history": state.history, "querybank": querybank}
        write_json_atomic(run_dir / "metrics.json", {**summary, "test": test} if test else summary)
    if writer:
        writer.close()
    distributed.barrier()
    return TrainResult(
        str(run_dir),
        str(run_dir / "best"),
        str(run_dir / "last"),
        state.best_epoch,
        state.best_score,
        state.history,
        test,
        state.step,
        time.perf_counter() - started,
        stopped_early,
        _record_skipped(run),
        querybank,
    )


def _train_epoch(run: _Run, state: RunState) -> None:
    """Train from `state`'s position to the end of its epoch, or until `max_steps` (sets `stopped`)."""
    cfg, model, cb = run.cfg, run.model, run.callbacks
    set_train_mode(model)
    encode_image, encode_text = _encoders(model, run.cached)
    t0 = time.perf_counter()  # pairs/s counts data loading too: it is the rate the run moves at
    batches = _epoch_batches(
        run.encoder, cfg, run.splits.train, run.cached, state.epoch, state.step_in_epoch, run.ranks, run.skipped
    )
    for images, texts, n_pairs in batches:
        lr = lr_at(state.step, cfg.optim.lr, run.warmup, run.total_steps)
        set_lr(run.optimizer, lr)
        loss = train_step(
            model,
            run.optimizer,
            run.trainable,
            encode_image,
            encode_text,
            images,
            texts,
            loss_kind=cfg.loss,
            micro_batch=cfg.micro_batch,
            autocast=run.autocast,
            scaler=run.scaler,
            grad_clip=cfg.optim.grad_clip,
        )
        state.step += 1
        state.step_in_epoch += 1
        state.epoch_losses.append(loss)
        if not math.isfinite(loss):
            raise UserError(f"The loss became {loss} at step {state.step}; lower --lr or use --precision bf16/fp32.")
        temperature = float(1 / model.logit_scale.detach().exp())
        now = time.perf_counter()
        pairs_per_second = n_pairs * run.ranks.world_size / max(now - t0, 1e-9)
        t0 = now
        if cb.on_step and run.ranks.is_main:
            cb.on_step(
                StepInfo(
                    state.epoch,
                    state.step,
                    state.step_in_epoch,
                    run.steps_per_epoch,
                    loss,
                    lr,
                    temperature,
                    pairs_per_second,
                )
            )
        if run.writer:
            run.writer.add_scalar("train/loss", loss, state.step)
            run.writer.add_scalar("train/lr", lr, state.step)
            run.writer.add_scalar("train/temperature", temperature, state.step)
        if cfg.max_steps and state.step >= cfg.max_steps:
            state.stopped = True
            return
        if cfg.save_every and state.step % cfg.save_every == 0:
            _save_last(run, state)


def _evaluate_epoch(run: _Run, state: RunState, epoch: int, train_loss: float | None, seconds: float) -> None:
    """Val metrics after `epoch` (0: the starting model): keep best/, append to the history, report."""
    metrics = _val_metrics(run)
    val = metrics.flat() if metrics else None
    score = metrics.mean_recall if metrics else None
    is_best = score is None or state.best_score is None or score > state.best_score
    if is_best:
        state.best_score, state.best_epoch = score, epoch
        if run.ranks.is_main:
            save_checkpoint(
                run.dir / "best",
                run.model,
                run.encoder.config,
                extra_json={"metrics.json": {"epoch": epoch, "step": state.step, "val": val}},
            )
        distributed.barrier()
    row = {
        "epoch": epoch,
        "step": state.step,
        "train_loss": train_loss,
        "val": val,
        "best": is_best,
        "seconds": round(seconds, 3),
    }
    state.history.append(row)
    _record_skipped(run)
    if run.ranks.is_main:
        write_json_atomic(run.dir / "metrics.json", {"history": state.history})
        if run.writer and val:
            for k, v in val.items():
                run.writer.add_scalar(f"val/{k}", v, state.step)
    if run.callbacks.on_epoch and run.ranks.is_main:
        run.callbacks.on_epoch(EpochInfo(epoch, state.step, train_loss, val, is_best, seconds))


def _record_skipped(run: _Run) -> SkippedImages:
    """Every rank's skipped images, listed by rank 0 in RUN_DIR/_errors.jsonl (the embed format)."""
    mine = list(run.skipped.values())
    if run.ranks.enabled:
        box: list = [None] * run.ranks.world_size
        torch.distributed.all_gather_object(box, mine)
        mine = [e for part in box for e in part]
    entries = list({e["path"]: e for e in mine}.values())
    if run.ranks.is_main and entries:
        return write_skipped(run.dir, entries)
    return SkippedImages(entries, str(run.dir / ERRORS_FILE) if entries else None)


def _save_last(run: _Run, state: RunState) -> None:
    """Write last/: weights plus everything `resume` needs (state, optimiser, every rank's RNG)."""
    rngs = _gather_rng(run.ranks)
    if run.ranks.is_main:
        fields = state.to_checkpoint()
        save_checkpoint(
            run.dir / "last",
            run.model,
            run.encoder.config,
            state={
                "step": fields["step"],
                "epoch": fields["epoch"],
                "step_in_epoch": fields["step_in_epoch"],
                "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict() if run.scaler else None,
                "rng": rngs,
                "best_score": fields["best_score"],
                "best_epoch": fields["best_epoch"],
                "history": fields["history"],
                "epoch_losses": fields["epoch_losses"],
                "config": json.dumps(run.cfg.to_dict()),
            },
        )
    distributed.barrier()


def _val_metrics(run: _Run) -> RetrievalMetrics | None:
    """Val metrics of the model in training (rank 0 computes, every rank gets the result)."""
    if not run.splits.val:
        return None
    result = None
    if run.ranks.is_main:
        model = run.model
        was_training = model.training
        model.eval()
        try:
            if run.cached is not None and "val" in run.cached:
                from retriever.metrics import retrieval_metrics
                from retriever.training.cache import cached_eval_embeddings

                val = run.cached["val"]
                img, txt = cached_eval_embeddings(run.cached["split"], val, run.encoder.device)
                result = retrieval_metrics(img, txt, val.text_image())
            else:
                from retriever.evaluation import evaluate

                result = evaluate(
                    run.encoder, run.splits.val, batch_size=run.cfg.eval_batch_size, workers=run.cfg.workers
                ).metrics
        finally:
            if was_training:
                set_train_mode(model)
    return distributed.broadcast_object(result)


# ------------------------------------------------------------------------------------------------


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainable: list[torch.nn.Parameter],
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    encode_text: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    texts: torch.Tensor,
    *,
    loss_kind: str = "infonce",
    micro_batch: int | None = None,
    autocast: Callable = contextlib.nullcontext,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
) -> float:
    """One optimiser step on one (global) batch: gradients (GradCache when chunked), cross-rank
    average, unscale + clip, AdamW (through the GradScaler for fp16), temperature clamp.

    The whole of what the loop does per step, so benchmarks/bench_train.py times exactly this.
    """
    optimizer.zero_grad(set_to_none=True)
    loss = contrastive_backward(
        encode_image,
        encode_text,
        images,
        texts,
        lambda i, t: contrastive_loss(loss_kind, i, t, model),
        micro_batch=micro_batch,
        autocast=autocast,
        scale=scaler.scale if scaler is not None else (lambda x: x),
        module=model,
    )
    distributed.average_gradients(trainable)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(trainable, grad_clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    clamp_logit_scale(model)
    return loss


def _check_run_dir(run: Path, cfg: TrainConfig, ranks: distributed.DistInfo) -> None:
    """A new run needs an empty RUN_DIR; a resume needs the same configuration."""
    saved = run / "run.json"
    mine = cfg.to_dict()
    if run.exists() and not run.is_dir():
        raise UserError(f"--out {run} is a file, not a run folder; choose a new folder.")
    if cfg.resume and saved.is_file() and not has_checkpoint(run):
        pass  # killed before its first checkpoint: checked below as a new run over a restartable folder
    elif cfg.resume:
        if not saved.is_file():
            raise UserError(f"Cannot resume: {run} has no run.json (was it written by `retriever train`?).")
        diff = settings_differ(cfg, run)
        if diff:
            raise UserError(
                f"Cannot resume {run} with different settings ({', '.join(diff)}); use the original options."
            )
        return
    if run.exists() and _entries(run) and not _restartable(run):
        if saved.is_file():
            raise UserError(f"{run} already holds a run; pass --resume to continue it, or choose another --out.")
        raise UserError(f"--out {run} is not a training run folder (no run.json); choose a new or empty folder.")
    distributed.barrier()  # every rank checks before rank 0 writes run.json
    if ranks.is_main:
        write_json_atomic(saved, mine)


def settings_differ(cfg: TrainConfig, run: Path, ignore: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The settings in which `cfg` differs from the run in `run` (its run.json), those a resume
    may change and `ignore` apart; [] when `run` holds no run."""
    saved = run / "run.json"
    if not saved.is_file():
        return []
    mine, theirs = cfg.to_dict(), json.loads(saved.read_text())
    skip = _RESUMABLE_CHANGES | set(ignore)
    return sorted(k for k in set(mine) | set(theirs) if k not in skip and mine.get(k) != theirs.get(k))


def has_checkpoint(run: Path) -> bool:
    return (run / "last" / "train_state.pt").is_file()


# What a run killed before its first checkpoint can hold; everything in it is rebuilt by a new start.
_BEFORE_FIRST_CHECKPOINT = {"run.json", "init", "features", "metrics.json", "_errors.jsonl"}


def _entries(run: Path) -> set[str]:
    """What a run folder holds, hidden entries (the lock file, temp files) apart."""
    return {p.name for p in run.iterdir() if not p.name.startswith(".")}


def _restartable(run: Path) -> bool:
    """A run folder with a run.json but no checkpoint yet: nothing in it is worth keeping."""
    names = _entries(run)
    return (run / "run.json").is_file() and not has_checkpoint(run) and names <= _BEFORE_FIRST_CHECKPOINT


def _status(cb: Callbacks, ranks: distributed.DistInfo, text: str) -> None:
    if cb.on_status and ranks.is_main:
        cb.on_status(text)


def _tensorboard(cfg: TrainConfig, ranks: distributed.DistInfo):
    if not cfg.logdir or not ranks.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError("--logdir needs the tensorboard package: pip install tensorboard.") from e
    return SummaryWriter(cfg.logdir)


def _gather_rng(ranks: distributed.DistInfo) -> list:
    mine = rng_state()
    if not ranks.enabled:
        return [mine]
    box: list = [None] * ranks.world_size
    torch.distributed.all_gather_object(box, mine)
    return box


def _encoders(model, cached):
    if cached is not None:
        split = cached["split"]
        return split.encode_image, split.encode_text
    return (lambda x: model.encode_image(x, normalize=True)), (lambda t: model.encode_text(t, normalize=True))


def _epoch_batches(encoder: LoadedModel, cfg: TrainConfig, items, cached, epoch, start_step, ranks, skipped):
    """(images, tokens, pairs) per step of this rank; cached tower outputs with --cache-features."""
    if cached is not None:
        train = cached["train"]
        samples = epoch_samples(train.items, epoch, cfg.seed)
        for positions in rank_batches(len(train.items), cfg.batch_size, ranks.rank, ranks.world_size, start_step):
            smp = [samples[p] for p in positions]
            img = train.image_rows([s.item for s in smp], [s.seed for s in smp]).to(encoder.device)
            txt = train.text[[train.text_row(s.item, s.caption) for s in smp]].to(encoder.device)
            yield img, txt, len(smp)
        return
    loader = epoch_loader(
        items,
        epoch,
        seed=cfg.seed,
        batch_size=cfg.batch_size,
        rank=ranks.rank,
        world=ranks.world_size,
        start_step=start_step,
        transform=encoder.preprocess_train if cfg.augment else encoder.preprocess,
        augment=cfg.augment,
        tokenizer=encoder.tokenizer,
        workers=cfg.workers,
        pin_memory=encoder.device.type == "cuda",
    )
    for pixels, tokens, errors in loader:
        for path, reason in errors:
            if path not in skipped:  # once per image, not once per epoch
                skipped[path] = skipped_entry(path, reason)
                log.warning("Skipped an unreadable training image: %s: %s", path, reason)
        if pixels is None:
            if not ranks.enabled:
                continue
            # Every rank takes part in every collective of a step (the loss's all_gather, the
            # gradient all-reduce): a rank that skipped would leave the others waiting forever.
            pixels, tokens = torch.zeros((0, 3, 1, 1)), torch.zeros((0, 1), dtype=torch.long)
        # Conv trunks (EfficientNet) run several times faster channels_last on CPU and use tensor
        # cores so on GPU; ViTs don't mind.
        pixels = pixels.to(encoder.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        yield pixels, tokens.to(encoder.device, non_blocking=True), len(pixels)


def _cache(encoder, cfg, splits, run, cb, ranks):
    from retriever.training.cache import compute_tower_features, split_towers

    split = split_towers(encoder.model)
    out = {"split": split}
    if cfg.augment:
        _status(cb, ranks, "Augmentation is off with --cache-features: each image's tower output is computed once.")
    for name, items in (("train", splits.train), ("val", splits.val)):
        if not items:
            continue
        _status(cb, ranks, f"Computing tower features for {len(items)} {name} images (once; reused by later runs)")
        progress = (
            (lambda d, t, n=name: cb.on_progress(f"features {n}", d, t)) if cb.on_progress and ranks.is_main else None
        )
        out[name] = compute_tower_features(
            encoder,
            split,
            items,
            cache_dir=Path(cfg.feature_cache) if cfg.feature_cache else run / "features",
            name=name,
            views=cfg.cache_views if name == "train" else 1,  # validation sees what an index sees
            batch_size=32,
            workers=cfg.workers,
            progress=progress,
        )
        if out[name].reused:
            n_new = len(items) - out[name].reused
            _status(cb, ranks, f"{out[name].reused} of them were in the feature cache; the towers ran on {n_new}")
    if len(out["train"].items) < cfg.batch_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is larger than the {len(out['train'].items)} decodable training images."
        )
    return out


def _fit_querybank(run: _Run) -> dict | None:
    """Give best/ its querybank (`retriever.training.querybank`): the best weights are loaded into
    the model in memory (training is over) so that cached tower outputs serve as they are."""
    result = None
    if run.ranks.is_main:
        from safetensors.torch import load_file

        from retriever.models.folder import WEIGHTS_FILE, recorded_weights_sha256, state_sha256
        from retriever.training.querybank import fit_querybank

        best = run.dir / "best"
        weights = load_file(str(best / WEIGHTS_FILE))
        run.model.load_state_dict(weights)
        run.model.eval()
        with torch.no_grad():
            result = fit_querybank(
                run.encoder,
                best,
                recorded_weights_sha256(best) or state_sha256(weights),
                run.splits.train,
                run.splits.val,
                run.cfg.querybank,
                cached=run.cached,
                batch_size=run.cfg.eval_batch_size,
                workers=run.cfg.workers,
                seed=run.cfg.seed,
                say=lambda line: _status(run.callbacks, run.ranks, line),
            )
    distributed.barrier()
    return distributed.broadcast_object(result)


def _evaluate_folder(folder: Path, items, cfg, device, precision, ranks, cb) -> dict | None:
    result = None
    if ranks.is_main:
        from retriever.evaluation import evaluate
        from retriever.querybank import read_querybank

        _status(cb, ranks, f"Evaluating {folder} on {len(items)} test images")
        encoder = load_model(f"local-dir:{folder}", device=device, precision=precision)
        bank = read_querybank(folder, encoder.identity.weights_sha256)
        result = evaluate(
            encoder, items, batch_size=cfg.eval_batch_size, workers=cfg.workers, querybank=bank
        ).metrics.to_dict()
    return distributed.broadcast_object(result)
