"""Retrieval evaluation of a model on an image–caption source: `retriever eval` and per-epoch val."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from retriever.data.loading import ImageDataset, collate_decoded
from retriever.data.sources import SourceItem
from retriever.errors import UserError
from retriever.metrics import RetrievalMetrics, retrieval_metrics
from retriever.models.encode import encode_image_tensors, encode_texts
from retriever.models.load import LoadedModel
from retriever.querybank import QueryBank
from retriever.skipped import SkippedImages, skipped_entry


@dataclass
class EvalResult:
    """Recall@1/5/10 and ranks both ways (`metrics`) and the images that could not be decoded."""

    metrics: RetrievalMetrics
    skipped: SkippedImages = field(default_factory=SkippedImages)  # images that could not be decoded

    def to_dict(self) -> dict:
        return {**self.metrics.to_dict(), "skipped_images": self.skipped.entries}


@dataclass
class EvalSet:
    """Normalised embeddings of an evaluation split: images, all their captions, and who owns which."""

    image_emb: np.ndarray
    text_emb: np.ndarray
    text_image: list[int]
    skipped: list[dict]  # skipped_entry(path, reason) per undecodable image


def embed_eval_set(
    encoder: LoadedModel,
    items: Sequence[SourceItem],
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> EvalSet:
    """Encode every image (eval transform) and every caption of `items`."""
    ds = ImageDataset([it.path for it in items], encoder.preprocess)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_decoded)
    keep: list[int] = []
    feats: list[np.ndarray] = []
    skipped: list[dict] = []
    for batch in loader:
        skipped += [skipped_entry(items[i].path, reason) for i, reason in batch.errors]
        if batch.pixels is not None:
            feats.append(encode_image_tensors(encoder, batch.pixels))
            keep += batch.indices
        if progress:
            progress(len(keep) + len(skipped), len(items))
    if not keep:
        raise UserError("None of the evaluation images could be decoded.")
    texts, owner = [], []
    for row, i in enumerate(keep):
        for c in items[i].captions:
            texts.append(c)
            owner.append(row)
    if not texts:
        raise UserError("The evaluation data has no captions; recall needs image–caption pairs.")
    return EvalSet(np.concatenate(feats), encode_texts(encoder, texts), owner, skipped)


def evaluate(
    encoder: LoadedModel,
    items: Sequence[SourceItem],
    *,
    batch_size: int = 64,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
    querybank: QueryBank | None = None,
) -> EvalResult:
    """Recall@1/5/10 and ranks in both directions of `encoder` on `items`.

    Args:
        encoder: the model to evaluate (`load_model`).
        items: image–caption pairs (`read_source`); every caption of an image counts as a match.
        batch_size: images per forward pass; workers: image-decoding processes (0: in this one).
        progress: called with (images done, images in all).
        querybank: score cross-modal pairs as an index built with this bank ranks them
            (`retriever.querybank`; the model folder's own: `read_querybank(folder)`).
    """
    es = embed_eval_set(encoder, items, batch_size=batch_size, workers=workers, progress=progress)
    metrics = retrieval_metrics(
        torch.from_numpy(es.image_emb), torch.from_numpy(es.text_emb), es.text_image, querybank=querybank
    )
    return EvalResult(metrics, SkippedImages(es.skipped))
