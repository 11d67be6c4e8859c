"""The querybank a training run leaves in its best model folder (`retriever.querybank`).

After the last epoch the best model embeds the training split (its bank of queries: captions for
image galleries, images for caption galleries) and the validation split; validation then chooses
the temperature among `TAUS`, or none when plain cosine ranks as well. With cached tower outputs
both are the cache through the best heads, so this costs no tower pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retriever.data.sources import SourceItem
from retriever.metrics import retrieval_metrics
from retriever.models.load import LoadedModel
from retriever.querybank import BANK_FILE, MAX_BANK_ROWS, TAUS, QueryBank, sample_rows, write_querybank


def parse_querybank(value: str) -> float | None:
    """`TrainConfig.querybank` as a temperature: None for "auto" (chosen on validation), 0 for
    "off", else the number. Raises ValueError for anything else."""
    v = value.strip().lower()
    if v == "auto":
        return None
    if v == "off":
        return 0.0
    tau = float(v)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(value)
    return tau


def choose_tau(
    bank_text: np.ndarray,
    bank_image: np.ndarray,
    val_image: np.ndarray,
    val_text: np.ndarray,
    text_image: Sequence[int],
    taus: Sequence[float] = TAUS,
) -> tuple[float | None, dict[str, float]]:
    """The temperature with the best validation mean recall, None when plain cosine is as good;
    and every candidate's score ("plain", "0.1", …)."""
    img, txt = torch.from_numpy(val_image), torch.from_numpy(val_text)
    scores = {"plain": retrieval_metrics(img, txt, text_image).mean_recall}
    best: float | None = None
    for tau in taus:
        bank = QueryBank(bank_text, bank_image, tau, "")
        scores[repr(tau)] = retrieval_metrics(img, txt, text_image, querybank=bank).mean_recall
        if scores[repr(tau)] > scores[repr(best) if best is not None else "plain"]:
            best = tau
    return best, scores


def fit_querybank(
    encoder: LoadedModel,
    folder: Path,
    weights_sha256: str,
    train: Sequence[SourceItem],
    val: Sequence[SourceItem],
    setting: str,
    *,
    cached: dict[str, Any] | None = None,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    say: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Embed the bank with `encoder` (holding the weights saved in `folder`, whose hash is
    `weights_sha256`), choose tau, and write the bank into `folder`.

    setting: `TrainConfig.querybank` ("auto", "off" or a temperature). cached: the run's cached
    tower outputs ({"split", "train", "val"}; the split's heads are `encoder`'s), used instead of
    running the towers. say: called with a line on what is done and decided. Returns what was
    decided, for metrics.json: {"tau": float | None, "bank": rows, "val_mean_recall": {...}}.
    """
    fixed = parse_querybank(setting)
    (folder / BANK_FILE).unlink(missing_ok=True)  # a bank of earlier weights is never left behind
    if fixed == 0.0:
        return {"tau": None, "reason": "off"}
    if fixed is None and not val:
        say("No querybank: no validation split to choose tau on (--querybank 0.1 fixes one)")
        return {"tau": None, "reason": "no validation split to choose the temperature on"}
    say(
        "Querybank: embedding the training split"
        + (", choosing tau on validation" if fixed is None else f" for tau {fixed}")
    )
    if cached is None and len(train) > MAX_BANK_ROWS:  # the towers run over a sample, not the whole split
        train = [train[i] for i in sample_rows(np.arange(len(train)), seed=seed)]
    bank_image, bank_text, _ = _embeddings(encoder, train, cached, "train", batch_size, workers)
    # At most MAX_BANK_ROWS each, chosen with the bank as the file stores it (float16), so
    # validation scores what searches do.
    bank_image, bank_text = (
        sample_rows(b, seed=seed).astype(np.float16).astype(np.float32) for b in (bank_image, bank_text)
    )
    scores: dict[str, float] = {}
    tau = fixed
    if tau is None:
        val_image, val_text, text_image = _embeddings(encoder, val, cached, "val", batch_size, workers)
        tau, scores = choose_tau(bank_text, bank_image, val_image, val_text, text_image)
    out: dict[str, Any] = {"tau": tau, "bank": {"text": len(bank_text), "image": len(bank_image)}}
    if scores:
        out["val_mean_recall"] = scores
    if tau is not None:
        write_querybank(folder, QueryBank(bank_text, bank_image, tau, weights_sha256))
        say(f"Querybank normalisation on, tau {tau} (cross-modal searches of indexes built from it rank hubs lower)")
    return out


def _embeddings(encoder, items, cached, name, batch_size, workers) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(image rows, caption rows, caption -> image row) of a split as unit vectors: its cached tower
    outputs through the heads when the run has them, else the towers over `items`."""
    if cached is not None and name in cached:
        from retriever.training.cache import cached_eval_embeddings

        img, txt = cached_eval_embeddings(cached["split"], cached[name], encoder.device)
        return img.numpy(), txt.numpy(), cached[name].text_image()
    from retriever.evaluation import embed_eval_set

    es = embed_eval_set(encoder, items, batch_size=batch_size, workers=workers)
    return es.image_emb, es.text_emb, es.text_image
