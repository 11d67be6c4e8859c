"""Querybank normalisation: cross-modal scores corrected for hubs, as a per-item bias.

Bogolin et al. 2022, "Cross Modal Retrieval with Querybank Normalisation" (the inverted softmax
of Smith et al. 2017): a gallery item that is close to *every* query, a hub, crowds the top of
many result lists. Dividing its exp-similarity to a query by its summed exp-similarity to a bank
of typical queries (the training captions, for an image gallery) at temperature tau ranks it lower:

    score(q, g) = <q, g> / tau - logsumexp_b(<b, g> / tau)

For a fixed query the ranking is that of `<q, g> + bias(g)` with `bias(g) = -tau·logsumexp_b(<b, g>
/ tau)`, a number per gallery item that does not depend on the query. So an index stores one bias
per row (computed when it is built) and a text→image or image→text search adds it to the cosine
of its candidates; image→image and text→text searches do not use it.

A model folder carries its bank and the tau chosen on validation in `querybank.safetensors`
(written by `retriever train`); an index built from that model copies it, to bias rows added later.
NumPy only: the query path does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

BANK_FILE = "querybank.safetensors"
# The temperatures training chooses among on validation (or none of them: plain cosine). The
# paper's best values for CLIP-like models lie in this range; RESULTS.md has the demo's.
TAUS = (0.05, 0.1, 0.2)
# Rows kept per modality (a seeded sample of larger training sets): biasing an index costs
# rows·bank·dim multiply-adds when it is built (RESULTS.md measures it). The logsumexp is led by a
# row's nearest captions, which a sample of this size still holds.
MAX_BANK_ROWS = 8192
# The rows file column holding each row's bias (float32), in indexes built with a bank.
BIAS_COLUMN = "_querybank_bias"


@dataclass(frozen=True)
class QueryBank:
    """A model's bank of training queries, both modalities, and the temperature it was chosen with.

    text: unit vectors of training captions (the queries an image gallery is normalised against);
    image: unit vectors of training images (for a caption gallery); tau: the temperature;
    weights_sha256: the model whose vectors these are (a bank is only valid for its own model).
    """

    text: np.ndarray
    image: np.ndarray
    tau: float
    weights_sha256: str

    def bank_for(self, gallery_modality: str) -> np.ndarray:
        """The queries that search a `gallery_modality` gallery: captions for images, and back."""
        return self.text if gallery_modality == "image" else self.image

    def bias(self, gallery: np.ndarray, gallery_modality: str) -> np.ndarray:
        """The per-item bias of `gallery` rows (unit vectors of `gallery_modality`)."""
        return hub_bias(gallery, self.bank_for(gallery_modality), self.tau)


def hub_bias(gallery: np.ndarray, bank: np.ndarray, tau: float, chunk: int = 1024) -> np.ndarray:
    """-tau·logsumexp(bank @ g / tau) for each row g of `gallery`, as float32 (per chunk of rows, so
    memory stays chunk·len(bank); the row's largest term is factored out, so exp never overflows)."""
    gallery = np.asarray(gallery, np.float32)
    bank = np.asarray(bank, np.float32)
    out = np.empty(len(gallery), np.float32)
    for lo in range(0, len(gallery), chunk):
        sims = gallery[lo : lo + chunk] @ bank.T
        sims /= np.float32(tau)
        top = sims.max(axis=1, keepdims=True)
        sims -= top
        np.exp(sims, out=sims)
        out[lo : lo + chunk] = -tau * (top[:, 0] + np.log(sims.sum(axis=1, dtype=np.float64)))
    return out


def sample_rows(x: np.ndarray, limit: int = MAX_BANK_ROWS, seed: int = 0) -> np.ndarray:
    """`x` itself when it has at most `limit` rows, else a seeded sample of `limit` rows in order."""
    if len(x) <= limit:
        return x
    keep = np.sort(np.random.default_rng(seed).choice(len(x), limit, replace=False))
    return x[keep]


def write_querybank(folder: str | Path, bank: QueryBank) -> Path:
    """Write `bank` into `folder` (atomically) as float16 rows plus tau and the model's hash."""
    from safetensors.numpy import save

    from retriever.atomic import write_bytes_atomic

    path = Path(folder) / BANK_FILE
    tensors = {"text": bank.text.astype(np.float16), "image": bank.image.astype(np.float16)}
    meta = {"tau": repr(float(bank.tau)), "weights_sha256": bank.weights_sha256}
    write_bytes_atomic(path, save(tensors, metadata=meta))
    return path


def read_querybank(folder: str | Path, weights_sha256: str | None = None) -> QueryBank | None:
    """The bank in `folder`, or None when there is none, or it belongs to other weights than
    `weights_sha256` (a model retrained in place keeps no stale bank), or it cannot be read."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(Path(folder) / BANK_FILE), framework="numpy") as f:
            meta = f.metadata() or {}
            bank = QueryBank(
                text=f.get_tensor("text").astype(np.float32),
                image=f.get_tensor("image").astype(np.float32),
                tau=float(meta["tau"]),
                weights_sha256=str(meta["weights_sha256"]),
            )
    except (OSError, KeyError, ValueError, SafetensorError):
        return None
    if weights_sha256 is not None and bank.weights_sha256 != weights_sha256:
        return None
    if not (bank.tau > 0 and len(bank.text) and len(bank.image)):
        return None
    return bank


def model_querybank(model_name: str, weights_sha256: str) -> QueryBank | None:
    """The bank of a model given as `local-dir:FOLDER` (the only kind that can carry one)."""
    if not model_name.startswith("local-dir:"):
        return None
    return read_querybank(Path(model_name.removeprefix("local-dir:")).expanduser(), weights_sha256)
