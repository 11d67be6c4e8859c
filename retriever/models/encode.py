"""Turn images and strings into L2-normalised float32 vectors with a loaded model."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from retriever.data.images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from retriever.models.load import LoadedModel


@torch.no_grad()
def encode_image_tensors(encoder: LoadedModel, pixels: torch.Tensor) -> np.ndarray:
    """Encode a preprocessed batch (N, 3, H, W); returns (N, D) unit vectors."""
    encoder.model.eval()
    # channels_last: several times faster for conv trunks on CPU, and the layout cuDNN's
    # tensor-core convolutions want under fp16/bf16 on a GPU; harmless for ViTs.
    pixels = pixels.to(encoder.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    with encoder.autocast():
        feats = encoder.model.encode_image(pixels)
    return _normalise(feats)


def drop_padding_columns(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The (N, L) token batch without its trailing columns that hold only padding (one at least);
    the torch twin of retriever.onnx.runtime.drop_padding_columns, which must stay torch-free."""
    used = (tokens != pad_id).any(dim=0).nonzero()
    return tokens[:, : int(used.max()) + 1 if len(used) else 1]


@torch.no_grad()
def encode_token_batch(encoder: LoadedModel, tokens: torch.Tensor) -> np.ndarray:
    encoder.model.eval()
    text = getattr(encoder.model, "text", None)
    if text is not None and type(text).__name__ == "HFTextEncoder":
        # An HF tower masks its padding, so trailing columns that are padding in every row change
        # nothing: dropping them makes a short query cost a fraction of a full-context pass.
        # (open_clip's own text transformer adds its whole positional table and keeps its length.)
        tokens = drop_padding_columns(tokens, text.config.pad_token_id)
    with encoder.autocast():
        feats = encoder.model.encode_text(tokens.to(encoder.device))
    return _normalise(feats)


def encode_images(
    encoder: LoadedModel,
    images: Iterable[ImageInput],
    batch_size: int = 32,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Encode images into (N, D) float32 unit vectors. Raises on an undecodable image (a caller's input).

    Args:
        encoder: the loaded model (`load_model`).
        images: paths, raw bytes or PIL images.
        batch_size: images per forward pass.
        max_pixels: refuse (ValueError) an image that decodes to more pixels (None: no limit).
    """
    out, batch = [], []
    for img in images:
        batch.append(encoder.preprocess(load_image(img, max_pixels)))
        if len(batch) == batch_size:
            out.append(encode_image_tensors(encoder, torch.stack(batch)))
            batch = []
    if batch:
        out.append(encode_image_tensors(encoder, torch.stack(batch)))
    return np.concatenate(out) if out else np.zeros((0, encoder.embed_dim), np.float32)


def encode_texts(encoder: LoadedModel, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """Encode captions or queries into (N, D) float32 unit vectors.

    Args:
        encoder: the loaded model (`load_model`).
        texts: the strings (a single string is one text).
        batch_size: texts per forward pass.
    """
    if isinstance(texts, str):
        texts = [texts]
    out = [
        encode_token_batch(encoder, encoder.tokenizer(list(texts[i : i + batch_size])))
        for i in range(0, len(texts), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, encoder.embed_dim), np.float32)


def count_truncated(tokenizer, texts: Sequence[str]) -> int:
    """How many of `texts` are longer than the tokenizer's context (and so encoded from their start only)."""
    context = getattr(tokenizer, "context_length", None)
    if not context:
        return 0
    return sum(1 for t in texts if (_token_count(tokenizer, t) or 0) > context)


def _token_count(tokenizer, text: str) -> int | None:
    """Tokens including start/end markers: open_clip's BPE tokenizer, or a wrapped Hugging Face one."""
    if hasattr(tokenizer, "sot_token_id") and hasattr(tokenizer, "encode"):
        clean = getattr(tokenizer, "clean_fn", None)
        return len(tokenizer.encode(clean(text) if clean else text)) + 2
    hf = getattr(tokenizer, "tokenizer", None)
    if callable(hf):
        return len(hf(text)["input_ids"])
    return None


def _normalise(feats: torch.Tensor) -> np.ndarray:
    feats = feats.float()
    feats = feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return feats.cpu().numpy().astype(np.float32, copy=False)
