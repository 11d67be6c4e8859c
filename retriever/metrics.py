"""Retrieval metrics with several captions per image, defined as LAION's clip_benchmark does.

A query is a hit at k when *any* of its true matches is among its top k results: a text's single
image for text→image, any of an image's captions for image→text. The rank of a query is the
position (1-based) of its best-placed true match; mean and median rank summarise it.

Ties are broken by gallery order (the earlier item ranks first), i.e. the order of a stable sort.
A fixed rule makes results reproducible; `torch.topk`, which clip_benchmark uses, leaves ties to
the implementation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch

from retriever.querybank import QueryBank

KS = (1, 5, 10)


@dataclass
class DirectionMetrics:
    recall: dict[int, float]  # k -> fraction of queries with a true match in the top k
    mean_rank: float
    median_rank: float
    queries: int


@dataclass
class RetrievalMetrics:
    text_to_image: DirectionMetrics
    image_to_text: DirectionMetrics
    images: int
    texts: int

    @property
    def mean_recall(self) -> float:
        """Mean of R@1/5/10 over both directions: the model-selection score."""
        vals = [*self.text_to_image.recall.values(), *self.image_to_text.recall.values()]
        return float(np.mean(vals))

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("text_to_image", "image_to_text"):
            d[key]["recall"] = {f"R@{k}": v for k, v in d[key]["recall"].items()}
        d["mean_recall"] = self.mean_recall
        return d

    def flat(self) -> dict[str, float]:
        """`t2i_R@5`-style keys, for logs and TensorBoard."""
        out = {}
        for short, m in (("t2i", self.text_to_image), ("i2t", self.image_to_text)):
            for k, v in m.recall.items():
                out[f"{short}_R@{k}"] = v
            out[f"{short}_mean_rank"] = m.mean_rank
            out[f"{short}_median_rank"] = m.median_rank
        out["mean_recall"] = self.mean_recall
        return out


def first_hit_ranks(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    positives: Sequence[Sequence[int]],
    chunk: int = 1024,
    gallery_bias: torch.Tensor | np.ndarray | None = None,
) -> np.ndarray:
    """0-based rank of each query's best-placed true match in the gallery, ties by gallery order.

    Scores are `queries @ gallery.T`, plus `gallery_bias` per gallery item when given (querybank
    normalisation, `retriever.querybank`). Computed in chunks of queries so memory stays
    O(chunk · gallery). A query without any true match gets rank = len(gallery) (never a hit).
    """
    n_gal = gallery.shape[0]
    order = torch.arange(n_gal)
    bias = None if gallery_bias is None else torch.as_tensor(np.asarray(gallery_bias, np.float32))[None, :]
    out = np.empty(len(positives), dtype=np.int64)
    for s in range(0, len(positives), chunk):
        e = min(s + chunk, len(positives))
        scores = (queries[s:e].float() @ gallery.float().T).cpu()
        if bias is not None:
            scores = scores + bias
        mask = torch.zeros_like(scores, dtype=torch.bool)
        for row, pos in enumerate(positives[s:e]):
            mask[row, list(pos)] = True
        # The best-placed match is the highest-scoring one, the earliest among equals; argmax
        # returns the first maximal index, which is exactly that.
        best = torch.where(mask, scores, torch.tensor(float("-inf"))).argmax(dim=1)
        best_score = scores.gather(1, best[:, None])
        ahead = (scores > best_score) | ((scores == best_score) & (order[None, :] < best[:, None]))
        ranks = ahead.sum(dim=1)
        ranks[~mask.any(dim=1)] = n_gal
        out[s:e] = ranks.numpy()
    return out


def direction_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> DirectionMetrics:
    return DirectionMetrics(
        recall={k: float(np.mean(ranks < k)) for k in ks},
        mean_rank=float(np.mean(ranks + 1)),
        median_rank=float(np.median(ranks + 1)),
        queries=int(len(ranks)),
    )


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_image: Sequence[int],
    ks: Sequence[int] = KS,
    querybank: QueryBank | None = None,
) -> RetrievalMetrics:
    """Both directions from normalised embeddings; `text_image[j]` is the image of caption j.

    With `querybank`, cross-modal scores carry its per-item bias, as a search of an index built
    with that bank ranks them (text→image: the images' bias, image→text: the captions')."""
    image_emb, text_emb = torch.as_tensor(image_emb), torch.as_tensor(text_emb)
    text_image = [int(i) for i in text_image]
    captions_of: list[list[int]] = [[] for _ in range(image_emb.shape[0])]
    for j, i in enumerate(text_image):
        captions_of[i].append(j)
    image_bias = text_bias = None
    if querybank is not None:
        image_bias = querybank.bias(image_emb.float().numpy(), "image")
        text_bias = querybank.bias(text_emb.float().numpy(), "text")
    t2i = first_hit_ranks(text_emb, image_emb, [[i] for i in text_image], gallery_bias=image_bias)
    # Images without a caption stay in the text→image gallery as distractors but cannot be
    # image→text queries: there is nothing to find.
    has_caption = [i for i, caps in enumerate(captions_of) if caps]
    i2t = first_hit_ranks(
        image_emb[has_caption], text_emb, [captions_of[i] for i in has_caption], gallery_bias=text_bias
    )
    return RetrievalMetrics(
        direction_metrics(t2i, ks), direction_metrics(i2t, ks), image_emb.shape[0], text_emb.shape[0]
    )
