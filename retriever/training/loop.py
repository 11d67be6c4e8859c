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
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from retriever.atomic import write_json_atomic
from retriever.data.sources import SourceItem, read_source
from retriever.errors import UserError
from retriever.metrics import RetrievalMetrics
from retriever.models.load import LoadedModel, load_model, resolve_device, resolve_precision
from retriever.training import distributed as D
from retriever.training.checkpoint import load_train_state, rng_state, save_checkpoint, set_rng_state
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
from retriever.training.losses import LOSSES, clamp_logit_scale, contrastive_loss, ensure_logit_bias
from retriever.training.optim import (
    OptimConfig,
    autocast_for,
    build_optimizer,
    lr_at,
    make_scaler,
    set_lr,
    warmup_steps,
)
from retriever.training.start import build_start_model, configure_trainable, set_train_mode

# Fields that may differ between a run and its --resume without changing the result.
_RESUMABLE_CHANGES = {"resume", "workers", "logdir", "max_steps", "save_every", "eval_batch_size"}


@dataclass
class TrainConfig:
    source: str
    out: str
    val: str | None = None  # explicit val source; else a seeded `val_fraction` of `source`
    test: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    image_column: str | None = None
    caption_column: str | None = None
    # Starting model: an open_clip spec, or two towers composed into one.
    model: str | None = None
    pretrained: str | None = None
    image_tower: str | None = None  # timm:NAME
    text_tower: str | None = None  # hf:PATH
    image_weights: str | None = None
    embed_dim: int = 512
    image_size: int = 224
    context_length: int = 32
    # Optimisation.
    epochs: int = 10
    batch_size: int = 64
    micro_batch: int | None = None  # GradCache chunk; None: the whole batch at once
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = "infonce"
    augment: bool = True
    lock_image: bool = False
    unlock_image_last: int = 0
    lock_text: bool = False
    unlock_text_last: int = 0
    grad_checkpointing: bool = False
    cache_features: bool = False
    cache_views: int = 1  # with --cache-features: the eval view plus N-1 seeded geometric views per image
    caption_templates: list[str] = field(default_factory=list)  # training captions under each "…{}…" template
    precision: str | None = None
    device: str | None = None
    seed: int = 0
    # Housekeeping.
    workers: int = 2
    eval_batch_size: int = 64
    logdir: str | None = None
    resume: bool = False
    save_every: int = 0  # also save last/ every N steps (0: at epoch ends only)
    max_steps: int | None = None  # stop early after this many steps in total (saved, resumable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    kw = dict(image_column=cfg.image_column, caption_column=cfg.caption_column)
    items = read_source(cfg.source, **kw)
    fractions = [0.0 if cfg.val else cfg.val_fraction, 0.0 if cfg.test else cfg.test_fraction]
    train, val, test = split_items(items, fractions, cfg.split_seed)
    if cfg.val:
        val = read_source(cfg.val, **kw)
    if cfg.test:
        test = read_source(cfg.test, **kw)
    train = with_templates(with_captions(train, "training"), cfg.caption_templates)
    return _Splits(train, [it for it in val if it.captions], [it for it in test if it.captions])


def train(cfg: TrainConfig, callbacks: Callbacks | None = None) -> TrainResult:
    """Run (or resume) a training run into `cfg.out`; returns where the best model is and the history."""
    cb = callbacks or Callbacks()
    started = time.perf_counter()
    _validate(cfg)
    run = Path(cfg.out).expanduser()
    device = resolve_device(cfg.device)
    dist = D.init_distributed(device.type)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.precision, device)
    if cfg.batch_size % dist.world_size:
        raise UserError(f"--batch-size {cfg.batch_size} must be divisible by the {dist.world_size} processes.")
    _check_run_dir(run, cfg, dist)

    splits = load_splits(cfg)
    if len(splits.train) < cfg.batch_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is larger than the {len(splits.train)} training images; lower it."
        )
    _status(cb, dist, f"{len(splits.train)} train, {len(splits.val)} val, {len(splits.test)} test images")

    state = load_train_state(run / "last") if cfg.resume else None
    encoder = build_start_model(cfg, run, device, precision, dist, resume=state is not None)
    model = encoder.model
    if cfg.loss == "siglip":
        ensure_logit_bias(model, encoder.config)
    configure_trainable(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UserError("Nothing to train: every parameter is locked.")

    torch.manual_seed(cfg.seed + dist.rank)  # per-rank dropout streams, as in open_clip
    optimizer = build_optimizer(model, cfg.optim)
    scaler = make_scaler(precision, device)
    autocast = autocast_for(precision, device)
    spe = steps_per_epoch(len(splits.train), cfg.batch_size)
    total_steps = spe * cfg.epochs
    warmup = warmup_steps(cfg.optim, total_steps)

    step, epoch, step_in_epoch = 0, 1, 0
    best_score, best_epoch, history = None, 0, []
    losses: list[float] = []  # this epoch's step losses (kept across a mid-epoch resume)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, step_in_epoch = int(state["step"]), int(state["epoch"]), int(state["step_in_epoch"])
        best_score = state.get("best_score")
        best_epoch = int(state.get("best_epoch", 0))
        history = json.loads(state["history"])
        losses = json.loads(state["epoch_losses"])
        rngs = state["rng"]
        if len(rngs) == dist.world_size:
            set_rng_state(rngs[dist.rank])

    writer = _tensorboard(cfg, dist)
    cached = None
    if cfg.cache_features:
        cached = _cache(encoder, cfg, splits, run, cb, dist)
    evaluator = _Evaluator(encoder, splits.val, cfg, cached, dist)

    def save_last(extra_json=None):
        rngs = _gather_rng(dist)
        if dist.is_main:
            save_checkpoint(
                run / "last",
                model,
                encoder.config,
                state={
                    "step": step,
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "rng": rngs,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "history": json.dumps(history),
                    "epoch_losses": json.dumps(losses),
                    "config": json.dumps(cfg.to_dict()),
                },
                extra_json=extra_json,
            )
        D.barrier()

    def record_epoch(ep: int, train_loss: float | None, seconds: float):
        nonlocal best_score, best_epoch
        metrics = evaluator()
        val = metrics.flat() if metrics else None
        score = metrics.mean_recall if metrics else None
        is_best = score is None or best_score is None or score > best_score
        if is_best:
            best_score, best_epoch = score, ep
            if dist.is_main:
                save_checkpoint(
                    run / "best",
                    model,
                    encoder.config,
                    extra_json={"metrics.json": {"epoch": ep, "step": step, "val": val}},
                )
            D.barrier()
        row = {
            "epoch": ep,
            "step": step,
            "train_loss": train_loss,
            "val": val,
            "best": is_best,
            "seconds": round(seconds, 3),
        }
        history.append(row)
        if dist.is_main:
            write_json_atomic(run / "metrics.json", {"history": history})
            if writer and val:
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, step)
        if cb.on_epoch and dist.is_main:
            cb.on_epoch(EpochInfo(ep, step, train_loss, val, is_best, seconds))

    if state is None:
        record_epoch(0, None, 0.0)  # the starting point: what fine-tuning has to beat
        save_last()

    stopped = False
    while epoch <= cfg.epochs and not stopped:
        t_epoch = time.perf_counter()
        set_train_mode(model)
        t0 = time.perf_counter()  # pairs/s counts data loading too: it is the rate the run moves at
        for images, texts, n_pairs in _epoch_batches(encoder, cfg, splits.train, cached, epoch, step_in_epoch, dist):
            lr = lr_at(step, cfg.optim.lr, warmup, total_steps)
            set_lr(optimizer, lr)
            enc_img, enc_txt = _encoders(model, cached)
            loss = train_step(
                model,
                optimizer,
                trainable,
                enc_img,
                enc_txt,
                images,
                texts,
                loss_kind=cfg.loss,
                micro_batch=cfg.micro_batch,
                autocast=autocast,
                scaler=scaler,
                grad_clip=cfg.optim.grad_clip,
            )
            step += 1
            step_in_epoch += 1
            losses.append(loss)
            if not math.isfinite(loss):
                raise UserError(f"The loss became {loss} at step {step}; lower --lr or use --precision bf16/fp32.")
            temperature = float(1 / model.logit_scale.detach().exp())
            now = time.perf_counter()
            info = StepInfo(
                epoch, step, step_in_epoch, spe, loss, lr, temperature, n_pairs * dist.world_size / max(now - t0, 1e-9)
            )
            t0 = now
            if cb.on_step and dist.is_main:
                cb.on_step(info)
            if writer:
                writer.add_scalar("train/loss", loss, step)
                writer.add_scalar("train/lr", lr, step)
                writer.add_scalar("train/temperature", temperature, step)
            if cfg.max_steps and step >= cfg.max_steps:
                stopped = True
                break
            if cfg.save_every and step % cfg.save_every == 0:
                save_last()
        if stopped and step_in_epoch < spe:
            save_last()
            break
        train_loss = sum(losses) / len(losses) if losses else None
        record_epoch(epoch, train_loss, time.perf_counter() - t_epoch)
        epoch, step_in_epoch, losses = epoch + 1, 0, []
        save_last()

    test = None
    if splits.test and not (stopped and epoch <= cfg.epochs):
        test = _evaluate_folder(run / "best", splits.test, cfg, device, precision, dist, cb)
        if dist.is_main:
            write_json_atomic(run / "metrics.json", {"history": history, "test": test})
    if writer:
        writer.close()
    D.barrier()
    return TrainResult(
        str(run),
        str(run / "best"),
        str(run / "last"),
        best_epoch,
        best_score,
        history,
        test,
        step,
        time.perf_counter() - started,
        stopped and epoch <= cfg.epochs,
    )


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
    D.average_gradients(trainable)
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


def _validate(cfg: TrainConfig) -> None:
    if cfg.loss not in LOSSES:
        raise UserError(f"Unknown loss {cfg.loss!r}; choose one of {', '.join(LOSSES)}.")
    if cfg.epochs < 1 or cfg.batch_size < 2:
        raise UserError(
            "--epochs must be at least 1 and --batch-size at least 2 (a contrastive batch needs negatives)."
        )
    if cfg.cache_views < 1 or (cfg.cache_views > 1 and not cfg.cache_features):
        raise UserError("--cache-views needs --cache-features and must be at least 1.")
    for t in cfg.caption_templates:
        if t.count("{}") != 1:
            raise UserError(f"Caption template {t!r} must contain '{{}}' exactly once (where the caption goes).")
    if cfg.micro_batch is not None and cfg.micro_batch < 1:
        raise UserError("--micro-batch must be at least 1.")
    if (cfg.image_tower is None) != (cfg.text_tower is None):
        raise UserError("Give both --image-tower timm:NAME and --text-tower hf:PATH to compose a model, or neither.")
    if cfg.image_tower and (cfg.model or cfg.pretrained):
        raise UserError("--model/--pretrained and --image-tower/--text-tower are alternatives; give one of them.")
    if (
        cfg.cache_features
        and not (cfg.lock_image and cfg.lock_text)
        or (cfg.cache_features and (cfg.unlock_image_last or cfg.unlock_text_last))
    ):
        raise UserError(
            "--cache-features needs both towers fully locked: --lock-image --lock-text, no unlocked layers."
        )


def _check_run_dir(run: Path, cfg: TrainConfig, dist: D.DistInfo) -> None:
    """A new run needs an empty RUN_DIR; a resume needs the same configuration."""
    saved = run / "run.json"
    mine = cfg.to_dict()
    if cfg.resume:
        if not saved.is_file():
            raise UserError(f"Cannot resume: {run} has no run.json (was it written by `retriever train`?).")
        theirs = json.loads(saved.read_text())
        diff = sorted(
            k for k in set(mine) | set(theirs) if k not in _RESUMABLE_CHANGES and mine.get(k) != theirs.get(k)
        )
        if diff:
            raise UserError(
                f"Cannot resume {run} with different settings ({', '.join(diff)}); use the original options."
            )
        return
    if run.exists() and any(run.iterdir()):
        raise UserError(f"{run} already holds a run; pass --resume to continue it, or choose another --out.")
    D.barrier()  # every rank checks before rank 0 writes run.json
    if dist.is_main:
        write_json_atomic(saved, mine)


def _status(cb: Callbacks, dist: D.DistInfo, text: str) -> None:
    if cb.on_status and dist.is_main:
        cb.on_status(text)


def _tensorboard(cfg: TrainConfig, dist: D.DistInfo):
    if not cfg.logdir or not dist.is_main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise UserError("--logdir needs the tensorboard package: pip install tensorboard.") from e
    return SummaryWriter(cfg.logdir)


def _gather_rng(dist: D.DistInfo) -> list:
    mine = rng_state()
    if not dist.enabled:
        return [mine]
    box: list = [None] * dist.world_size
    torch.distributed.all_gather_object(box, mine)
    return box


def _encoders(model, cached):
    if cached is not None:
        split = cached["split"]
        return split.encode_image, split.encode_text
    return (lambda x: model.encode_image(x, normalize=True)), (lambda t: model.encode_text(t, normalize=True))


def _epoch_batches(encoder: LoadedModel, cfg: TrainConfig, items, cached, epoch, start_step, dist):
    """(images, tokens, pairs) per step of this rank; cached tower outputs with --cache-features."""
    if cached is not None:
        train = cached["train"]
        samples = epoch_samples(train.items, epoch, cfg.seed)
        for positions in rank_batches(len(train.items), cfg.batch_size, dist.rank, dist.world_size, start_step):
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
        rank=dist.rank,
        world=dist.world_size,
        start_step=start_step,
        transform=encoder.preprocess_train if cfg.augment else encoder.preprocess,
        augment=cfg.augment,
        tokenizer=encoder.tokenizer,
        workers=cfg.workers,
    )
    for pixels, tokens, errors in loader:
        for e in errors:
            import logging

            logging.getLogger(__name__).warning("Skipped an unreadable training image: %s", e)
        if pixels is None:
            continue
        pixels = pixels.to(encoder.device, non_blocking=True)
        if encoder.device.type == "cpu":
            # Conv trunks (EfficientNet) run several times faster channels_last on CPU; ViTs don't mind.
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        yield pixels, tokens.to(encoder.device, non_blocking=True), len(pixels)


def _cache(encoder, cfg, splits, run, cb, dist):
    from retriever.training.cache import compute_tower_features, split_towers

    split = split_towers(encoder.model)
    out = {"split": split}
    if cfg.augment:
        _status(cb, dist, "Augmentation is off with --cache-features: each image's tower output is computed once.")
    for name, items in (("train", splits.train), ("val", splits.val)):
        if not items:
            continue
        _status(cb, dist, f"Computing tower features for {len(items)} {name} images (once; reused by later runs)")
        progress = (
            (lambda d, t, n=name: cb.on_progress(f"features {n}", d, t)) if cb.on_progress and dist.is_main else None
        )
        out[name] = compute_tower_features(
            encoder,
            split,
            items,
            cache_dir=run / "features",
            name=name,
            views=cfg.cache_views if name == "train" else 1,  # validation sees what an index sees
            batch_size=32,
            workers=cfg.workers,
            progress=progress,
        )
    if len(out["train"].items) < cfg.batch_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is larger than the {len(out['train'].items)} decodable training images."
        )
    return out


class _Evaluator:
    """Val metrics of the model in training (rank 0 computes, every rank gets the result)."""

    def __init__(self, encoder, items, cfg, cached, dist):
        self.encoder, self.items, self.cfg, self.cached, self.dist = encoder, items, cfg, cached, dist

    def __call__(self) -> RetrievalMetrics | None:
        if not self.items:
            return None
        result = None
        if self.dist.is_main:
            model = self.encoder.model
            was_training = model.training
            model.eval()
            try:
                if self.cached is not None and "val" in self.cached:
                    from retriever.metrics import retrieval_metrics
                    from retriever.training.cache import cached_eval_embeddings

                    val = self.cached["val"]
                    img, txt = cached_eval_embeddings(self.cached["split"], val, self.encoder.device)
                    result = retrieval_metrics(img, txt, val.text_image())
                else:
                    from retriever.evaluation import evaluate

                    result = evaluate(
                        self.encoder, self.items, batch_size=self.cfg.eval_batch_size, workers=self.cfg.workers
                    ).metrics
            finally:
                if was_training:
                    set_train_mode(model)
        return D.broadcast_object(result)


def _evaluate_folder(folder: Path, items, cfg, device, precision, dist, cb) -> dict | None:
    result = None
    if dist.is_main:
        from retriever.evaluation import evaluate

        _status(cb, dist, f"Evaluating {folder} on {len(items)} test images")
        encoder = load_model(f"local-dir:{folder}", device=device, precision=precision)
        result = evaluate(encoder, items, batch_size=cfg.eval_batch_size, workers=cfg.workers).metrics.to_dict()
    return D.broadcast_object(result)
