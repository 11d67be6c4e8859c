"""AdamW with CLIP's parameter groups, warmup + cosine schedule, and the AMP gradient scaler.

The schedule is a pure function of the step, so resuming needs only the step number.
"""

from __future__ import annotations

import math

import torch

from retriever.training.config import OptimConfig


def no_weight_decay(name: str, p: torch.nn.Parameter) -> bool:
    """Gains, biases and the loss's temperature/bias are not shrunk towards 0 (open_clip's rule)."""
    return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if not no_weight_decay(n, p)]
    keep = [p for n, p in named if no_weight_decay(n, p)]
    groups = [{"params": keep, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """Linear warmup to `base_lr` over `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if total <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / (total - warmup))
    return 0.5 * base_lr * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def make_scaler(precision: str, device: torch.device):
    """A GradScaler for fp16 on CUDA (fp16 gradients underflow without it); None otherwise."""
    if precision == "fp16" and device.type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def autocast_for(precision: str, device: torch.device):
    """A zero-argument factory of the autocast context for this precision (fp32: no autocast)."""
    import contextlib

    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)
