"""Exact large-batch contrastive gradients in the memory of one micro-batch (GradCache).

InfoNCE does not decompose over chunks of the batch: every pair is a negative for every other, so
accumulating per-chunk losses is a different (smaller-batch) objective. GradCache (Gao et al.
2021) gets the exact full-batch gradient in four passes:

1. forward each chunk without grad, remembering the RNG state before it;
2. compute the loss over the full batch of detached embeddings and backprop to the embeddings
   (this is also the one and only backward that reaches the loss parameters, logit_scale/bias);
3. re-forward each chunk with grad, replaying its RNG state so dropout and any stochastic layer
   draw the same masks as in pass 1, and
4. backprop the cached embedding gradients through that chunk.

open_clip's `--accum-freq` instead recomputes the full loss once per chunk, so the loss
parameters receive their gradient k times (exactly 4.00x with 4 chunks; see tests).

Exact for encoders that treat samples independently (ViTs, text transformers, CNNs with frozen or
eval-mode BatchNorm). A BatchNorm in train mode normalises with each chunk's statistics, so the
gradient is that of chunk-sized BN batches; its running statistics are restored after pass 1 so
they are updated once per chunk, not twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

Encode = Callable[[torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def contrastive_backward(
    encode_image: Encode,
    encode_text: Encode,
    images: torch.Tensor,
    texts: torch.Tensor,
    loss_fn: LossFn,
    *,
    micro_batch: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
    module: torch.nn.Module | None = None,
) -> float:
    """Accumulate into `.grad` the gradient of `loss_fn(encode_image(images), encode_text(texts))`.

    `encode_*` return normalised embeddings; `loss_fn` closes over the loss parameters. With
    `micro_batch` smaller than the batch, only one chunk's activations are alive at a time.
    `scale` is the fp16 GradScaler's `scale` (identity otherwise). `module` (the model behind the
    encoders) lets train-mode BatchNorm running stats be rolled back after the no-grad pass.
    Returns the unscaled loss.
    """
    n = images.shape[0]
    if n == 0:
        # A rank with no rows (its whole batch undecodable) still joins the loss's collectives
        # (forward all_gather, backward all-reduce) without running the towers, which refuse
        # empty input; gather_with_grad gives it the other ranks' feature width.
        img = torch.zeros((0, 0), device=images.device, requires_grad=True)
        txt = torch.zeros((0, 0), device=images.device, requires_grad=True)
        loss = loss_fn(img, txt)
        scale(loss).backward()
        return float(loss.detach())
    if micro_batch is None or micro_batch >= n:
        with autocast():
            img, txt = encode_image(images), encode_text(texts)
        loss = loss_fn(img.float(), txt.float())
        scale(loss).backward()
        return float(loss.detach())

    bounds = [(s, min(s + micro_batch, n)) for s in range(0, n, micro_batch)]
    rng_states, img_parts, txt_parts = [], [], []
    bn_stats = _bn_running_stats(module)
    with torch.no_grad():
        for s, e in bounds:
            rng_states.append(_rng_state(images.device))
            with autocast():
                img_parts.append(encode_image(images[s:e]).float())
                txt_parts.append(encode_text(texts[s:e]).float())
    after = _rng_state(images.device)
    _restore(bn_stats)

    img_all = torch.cat(img_parts).requires_grad_()
    txt_all = torch.cat(txt_parts).requires_grad_()
    loss = loss_fn(img_all, txt_all)
    scale(loss).backward()  # loss parameters get their gradient here, once
    img_grads, txt_grads = img_all.grad, txt_all.grad
    assert img_grads is not None and txt_grads is not None  # both are leaves that required grad

    for (s, e), state in zip(bounds, rng_states):
        _set_rng_state(state, images.device)
        with autocast():
            img = encode_image(images[s:e])
            txt = encode_text(texts[s:e])
        torch.autograd.backward([img, txt], [img_grads[s:e].to(img.dtype), txt_grads[s:e].to(txt.dtype)])
    _set_rng_state(after, images.device)
    return float(loss.detach())


def _bn_running_stats(module: torch.nn.Module | None):
    if module is None:
        return []
    return [
        (m, {k: b.clone() for k, b in m._buffers.items() if b is not None})
        for m in module.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training
    ]


def _restore(saved) -> None:
    with torch.no_grad():
        for m, buffers in saved:
            for k, b in buffers.items():
                m._buffers[k].copy_(b)


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
