"""Contrastive losses over a batch of paired image and text embeddings.

Both losses take L2-normalised features and the model's own loss parameters (`logit_scale`, the
log of the inverse temperature, and for SigLIP `logit_bias`), so the parameters live in the
checkpoint and open_clip reloads them. Under torch.distributed the features of every rank are
gathered with gradient first: all B·W pairs of the global batch are negatives for each other, and
every rank computes the same global loss (see `distributed.gather_with_grad` for why the gradients
come out exact).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from retriever.training.config import LOSSES
from retriever.training.distributed import gather_with_grad

# CLIP's initial temperature 0.07 and its cap of 100 on the logit scale (Radford et al. 2021).
INIT_LOGIT_SCALE = math.log(1 / 0.07)
MAX_LOGIT_SCALE = math.log(100)
# SigLIP's initialisation: t' = log 10, b = -10 (Zhai et al. 2023, section 3.2).
SIGLIP_INIT_LOGIT_SCALE = math.log(10)
SIGLIP_INIT_LOGIT_BIAS = -10.0


def infonce_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image→text and text→image cross-entropy, pair i's match is i.

    `logit_scale` is the *log* scale (the parameter); its exp multiplies the cosine similarities.
    """
    image, text = gather_with_grad(image), gather_with_grad(text)
    if image.shape[0] == 0:  # every rank's batch failed to decode: zero loss, zero gradients
        return logit_scale * 0.0
    logits = logit_scale.exp() * image @ text.T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss: every (image, text) cell is an independent binary match/no-match decision.

    Normalised by the number of images, as in the paper and open_clip's SigLipLoss.
    """
    image, text = gather_with_grad(image), gather_with_grad(text)
    if image.shape[0] == 0:  # every rank's batch failed to decode: zero loss, zero gradients
        return logit_scale * 0.0 + logit_bias * 0.0
    logits = logit_scale.exp() * image @ text.T + logit_bias
    labels = 2 * torch.eye(logits.shape[0], device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / logits.shape[0]


def contrastive_loss(kind: str, image: torch.Tensor, text: torch.Tensor, model: Any) -> torch.Tensor:
    """The loss named `kind`, with the loss parameters taken from `model`."""
    if kind == "infonce":
        return infonce_loss(image, text, model.logit_scale)
    if kind == "siglip":
        if getattr(model, "logit_bias", None) is None:
            raise ValueError("The SigLIP loss needs a model with a logit_bias parameter (see ensure_logit_bias).")
        return siglip_loss(image, text, model.logit_scale, model.logit_bias)
    raise ValueError(f"Unknown loss {kind!r}; choose one of {', '.join(LOSSES)}.")


def loss_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the loss (not the encoders) uses: they get one gradient per step."""
    return [p for p in (getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)) if p is not None]


def ensure_logit_bias(model: Any, config: dict, init: float = SIGLIP_INIT_LOGIT_BIAS) -> None:
    """Give an open_clip CLIP a learnable SigLIP bias and record it in its config.

    open_clip creates `logit_bias` only when the config has `init_logit_bias`; setting both keeps the
    saved folder loadable (strict state-dict load) by plain open_clip. The temperature is left as
    it is: a pretrained scale is knowledge worth keeping.
    """
    if getattr(model, "logit_bias", None) is not None:
        return
    ref = model.logit_scale
    model.logit_bias = torch.nn.Parameter(torch.full_like(ref.data, init))
    config.setdefault("model_cfg", {})["init_logit_bias"] = init


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module, max_log_scale: float = MAX_LOGIT_SCALE) -> None:
    """Keep exp(logit_scale) ≤ 100 after every optimiser step, as CLIP does, so training stays stable."""
    scale = getattr(model, "logit_scale", None)
    if scale is not None:
        scale.clamp_(0, max_log_scale)
