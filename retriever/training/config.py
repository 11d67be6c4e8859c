"""What a training run is asked to do: `TrainConfig` and `OptimConfig` (torch-free, so the CLI
can take its option defaults from here without importing torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from retriever.errors import ConfigError

LOSSES = ("infonce", "siglip")


@dataclass
class OptimConfig:
    """AdamW with warmup and cosine decay.

    Args:
        lr: peak learning rate.
        weight_decay: AdamW weight decay (not applied to gains, biases and the temperature).
        beta1, beta2, eps: AdamW's moments and epsilon (β2 = 0.98 as in CLIP: a smoother second
            moment for the large-batch contrastive loss).
        warmup: linear warm-up, a fraction of all steps when < 1, else a number of steps.
        grad_clip: maximum global gradient norm; None or 0 turns clipping off.
    """

    lr: float = 5e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: float = 0.05
    grad_clip: float | None = 1.0


@dataclass
class TrainConfig:
    """A training run (see `retriever.train`). The CLI's `retriever train` options are these fields.

    Data:
        source: training pairs, a folder or a manifest (see `read_source`).
        out: the run folder (best/, last/, metrics.json); a new run needs it empty.
        val, test: explicit validation / test sources; without them, seeded `val_fraction` /
            `test_fraction` shares of `source`'s images (split by image, seed `split_seed`).
        image_column, caption_column: manifest columns (guessed when None).
    Starting model (an open_clip spec, or two towers composed into one):
        model, pretrained: as for `load_model`.
        image_tower, text_tower: `timm:NAME` and `hf:PATH` towers to compose (both or neither).
        image_weights: local weights file for the timm tower.
        embed_dim, image_size, context_length: shape of a composed model.
    Optimisation:
        epochs: passes over the training images (one caption drawn per image each time).
        batch_size: pairs per contrastive batch over all processes (each pair's negatives).
        micro_batch: GradCache chunk per process; None computes the whole batch at once.
        optim: optimiser settings (`OptimConfig`).
        loss: "infonce" or "siglip".
        augment: open_clip's random-crop train transform.
        lock_image, lock_text: freeze a tower; unlock_image_last / unlock_text_last keep its last
            N layer groups trainable.
        grad_checkpointing: recompute activations in backward (less memory, slower).
        cache_features: both towers locked: compute tower outputs once, train heads on the cache;
            with unlock_image_last, the maps below the unlocked blocks are cached and those blocks train.
        cache_views: with cache_features, tower passes per training image: the eval view plus
            N-1 seeded geometric views (zoom, shift, small rotation; no flips, no colour); each
            epoch draws one cached view per image.
        feature_cache: folder of the cached tower outputs (default: `out/features`); runs that
            share one reuse each other's rows for the same images, captions and locked towers,
            so a refit on training + validation computes only the validation items.
        caption_templates: train on every caption under each template too ("an icon of {}");
            validation and test keep the plain captions.
        querybank: querybank normalisation of cross-modal search (`retriever.querybank`): "auto"
            embeds the training split into best/ as a bank and chooses its temperature on the
            validation split (none when plain cosine ranks as well); a number fixes the
            temperature (no validation needed); "off" writes no bank.
        precision, device: as for `load_model`.
        seed: seed of shuffling, caption choice, augmentation and dropout.
    Housekeeping:
        workers: image-decoding worker processes; eval_batch_size: batch size of evaluation.
        logdir: TensorBoard log folder.
        resume: continue the run in `out` exactly where it stopped.
        save_every: also save last/ every N steps (0: at epoch ends only).
        max_steps: stop after this many steps in total (saved, resumable).
    """

    source: str
    out: str
    val: str | None = None
    test: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.0
    split_seed: int = 0
    image_column: str | None = None
    caption_column: str | None = None
    model: str | None = None
    pretrained: str | None = None
    image_tower: str | None = None
    text_tower: str | None = None
    image_weights: str | None = None
    embed_dim: int = 512
    image_size: int = 224
    context_length: int = 32
    epochs: int = 10
    batch_size: int = 64
    micro_batch: int | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = "infonce"
    augment: bool = True
    lock_image: bool = False
    unlock_image_last: int = 0
    lock_text: bool = False
    unlock_text_last: int = 0
    grad_checkpointing: bool = False
    cache_features: bool = False
    cache_views: int = 1
    feature_cache: str | None = None
    caption_templates: list[str] = field(default_factory=list)
    querybank: str = "auto"
    precision: str | None = None
    device: str | None = None
    seed: int = 0
    workers: int = 2
    eval_batch_size: int = 64
    logdir: str | None = None
    resume: bool = False
    save_every: int = 0
    max_steps: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self, world_size: int = 1) -> None:
        """Raise `ConfigError` (naming the parameters) for settings that cannot make a run.

        Args:
            world_size: the number of training processes; `batch_size` is split evenly over them.
        """
        if self.loss not in LOSSES:
            raise ConfigError(f"Unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}.", "loss")
        if self.epochs < 1 or self.batch_size < 2:
            raise ConfigError(
                "epochs must be at least 1 and batch_size at least 2 (a contrastive batch needs negatives).",
                "epochs",
                "batch_size",
            )
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ConfigError("micro_batch must be at least 1.", "micro_batch")
        if self.cache_views < 1 or (self.cache_views > 1 and not self.cache_features):
            raise ConfigError(
                "cache_views needs cache_features and must be at least 1.", "cache_views", "cache_features"
            )
        if self.feature_cache and not self.cache_features:
            raise ConfigError("feature_cache needs cache_features.", "feature_cache", "cache_features")
        from retriever.training.querybank import parse_querybank

        try:
            parse_querybank(self.querybank)
        except ValueError:
            raise ConfigError(
                f"querybank must be auto, off or a temperature above 0, not {self.querybank!r}.", "querybank"
            ) from None
        for t in self.caption_templates:
            if t.count("{}") != 1:
                raise ConfigError(
                    f"Caption template {t!r} must contain '{{}}' exactly once (where the caption goes).",
                    "caption_templates",
                )
        if self.batch_size % world_size:
            raise ConfigError(
                f"batch_size {self.batch_size} must be divisible by the {world_size} processes.", "batch_size"
            )
        if (self.image_tower is None) != (self.text_tower is None):
            raise ConfigError(
                "Give both image_tower timm:NAME and text_tower hf:PATH to compose a model, or neither.",
                "image_tower",
                "text_tower",
            )
        if self.image_tower and (self.model or self.pretrained):
            raise ConfigError(
                "model/pretrained and image_tower/text_tower are alternatives; give one of them.",
                "model",
                "pretrained",
                "image_tower",
                "text_tower",
            )
        if self.unlock_image_last and not self.lock_image:
            raise ConfigError("unlock_image_last only makes sense with lock_image.", "unlock_image_last", "lock_image")
        if self.unlock_text_last and not self.lock_text:
            raise ConfigError("unlock_text_last only makes sense with lock_text.", "unlock_text_last", "lock_text")
        if self.cache_features and (not (self.lock_image and self.lock_text) or self.unlock_text_last):
            raise ConfigError(
                "cache_features needs both towers locked (lock_image and lock_text; only the image tower's last "
                "blocks may be unlocked, and they then train on cached maps).",
                "cache_features",
                "lock_image",
                "lock_text",
                "unlock_text_last",
            )
