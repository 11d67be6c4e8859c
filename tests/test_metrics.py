"""Our recall@k against LAION clip_benchmark's definition, and ranks on hand-made cases."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from retriever.metrics import first_hit_ranks, retrieval_metrics


def _clip_benchmark_recall_at_k():
    """Only clip_benchmark's retrieval metric module; its package has heavy optional deps."""
    try:
        return importlib.import_module("clip_benchmark.metrics.zeroshot_retrieval").recall_at_k
    except ImportError:
        spec = importlib.util.find_spec("clip_benchmark")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("clip-benchmark is not installed (pip install --no-deps clip-benchmark)")
        path = Path(next(iter(spec.submodule_search_locations))) / "metrics" / "zeroshot_retrieval.py"
        mod_spec = importlib.util.spec_from_file_location("_cb_zeroshot_retrieval", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        return mod.recall_at_k


def _ours_from_scores(scores: torch.Tensor, text_image: list[int]):
    """retrieval_metrics takes embeddings; identity gallery vectors make `queries @ gallery.T` = scores."""
    n_txt, n_img = scores.shape
    captions_of = [[j for j, i in enumerate(text_image) if i == img] for img in range(n_img)]
    t2i = first_hit_ranks(scores, torch.eye(n_img), [[i] for i in text_image])
    i2t = first_hit_ranks(scores.T.contiguous(), torch.eye(n_txt), captions_of)
    return t2i, i2t


def _theirs(recall_at_k, scores, text_image, k):
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_image)), torch.tensor(text_image)] = True
    # clip_benchmark's own reduction (zeroshot_retrieval.evaluate): a query is a hit if recall > 0.
    t2i = (recall_at_k(scores, positive, k) > 0).double().mean().item()
    i2t = (recall_at_k(scores.T, positive.T, k) > 0).double().mean().item()
    return t2i, i2t


def _case(seed, n_img=40, ties=False):
    g = torch.Generator().manual_seed(seed)
    caps_per_image = torch.randint(1, 5, (n_img,), generator=g)  # 1–4 captions each
    text_image = [i for i in range(n_img) for _ in range(int(caps_per_image[i]))]
    if ties:
        scores = torch.randint(0, 6, (len(text_image), n_img), generator=g).double()  # many ties
    else:
        scores = torch.randn(len(text_image), n_img, generator=g, dtype=torch.float64)
    # Make matches likelier than chance so recall is neither 0 nor 1.
    scores[torch.arange(len(text_image)), torch.tensor(text_image)] += 1.0
    return scores, text_image


@pytest.mark.parametrize("seed", range(5))
def test_recall_matches_clip_benchmark_without_ties(seed):
    recall_at_k = _clip_benchmark_recall_at_k()
    scores, text_image = _case(seed)
    t2i, i2t = _ours_from_scores(scores, text_image)
    for k in (1, 5, 10):
        theirs = _theirs(recall_at_k, scores, text_image, k)
        assert (np.mean(t2i < k), np.mean(i2t < k)) == pytest.approx(theirs, abs=1e-6)
        assert 0 < theirs[0] < 1


@pytest.mark.parametrize("seed", range(5))
def test_recall_matches_clip_benchmark_with_ties_broken_by_gallery_order(seed):
    """torch.topk leaves tie order unspecified; our rule (earlier gallery item first) is the one
    clip_benchmark gives once ties are broken explicitly the same way, by a tiny index penalty."""
    recall_at_k = _clip_benchmark_recall_at_k()
    scores, text_image = _case(seed, ties=True)
    t2i, i2t = _ours_from_scores(scores, text_image)
    eps_img = torch.arange(scores.shape[1], dtype=torch.float64) * 1e-6
    eps_txt = torch.arange(scores.shape[0], dtype=torch.float64) * 1e-6
    for k in (1, 5, 10):
        t2i_theirs, _ = _theirs(recall_at_k, scores - eps_img[None, :], text_image, k)
        _, i2t_theirs = _theirs(recall_at_k, scores - eps_txt[:, None], text_image, k)
        assert np.mean(t2i < k) == pytest.approx(t2i_theirs, abs=1e-6)
        assert np.mean(i2t < k) == pytest.approx(i2t_theirs, abs=1e-6)


def test_ranks_by_hand():
    # Two images; captions 0,1 belong to image 0 and caption 2 to image 1.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    m = retrieval_metrics(img, txt, [0, 0, 1])
    # text→image ranks: caption0→img0 first (1), caption1→img0 second (2), caption2→img1 second (2)
    assert m.text_to_image.recall[1] == pytest.approx(1 / 3)
    assert m.text_to_image.mean_rank == pytest.approx(5 / 3) and m.text_to_image.median_rank == 2
    # image→text: img0's best caption (0) is first; img1's caption 2 (0.4) is behind caption 1 (0.8)
    assert m.image_to_text.recall[1] == pytest.approx(0.5) and m.image_to_text.recall[5] == 1.0
    assert m.image_to_text.mean_rank == pytest.approx(1.5)
    assert m.mean_recall == pytest.approx(np.mean([1 / 3, 1, 1, 0.5, 1, 1]))


def test_tie_goes_to_the_earlier_gallery_item_and_captionless_images_are_not_queries():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # images 0 and 1 identical
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # caption 0 → image 0, caption 1 → image 1
    m = retrieval_metrics(img, txt, [0, 1])
    assert m.text_to_image.recall[1] == 0.5  # image 1 ties with image 0 and comes second
    assert m.image_to_text.queries == 2  # image 2 has no caption: a distractor only


def test_chunking_does_not_change_ranks():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    pos = [[i % 30, (i * 7) % 30] for i in range(50)]
    assert (first_hit_ranks(q, gal, pos, chunk=7) == first_hit_ranks(q, gal, pos, chunk=1000)).all()
