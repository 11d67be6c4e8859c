"""Which encoder answers a query: an ONNX export of the index's model when one is usable, else torch.

Torch-free by design: this module and what it imports at the top never load torch. The torch
encoder is built only when the ONNX path is refused (`--backend torch`, no export, or an export
that is stale, corrupt or unloadable); the reason is kept as one sentence for the caller to show.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from retriever.data.limits import DEFAULT_MAX_PIXELS
from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.onnx import EXPORT_JSON

BACKENDS = ("auto", "onnx", "torch")
EXPORT_SUBDIR = "onnx"

log = logging.getLogger(__name__)


def cache_dir(identity: ModelIdentity) -> Path:
    """Where exports of models without a folder of their own go: $RETRIEVER_ONNX_CACHE or ~/.cache."""
    root = (
        os.environ.get("RETRIEVER_ONNX_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retriever" / "onnx"
    )
    return Path(root) / identity.weights_sha256[:16]


def export_candidates(index_dir: str | Path | None, identity: ModelIdentity) -> list[Path]:
    """Where an export of the index's model may live: INDEX/onnx, the model folder's onnx/, then
    the cache keyed by the weights' SHA-256 (where `embed --backend onnx` exports)."""
    out = []
    if index_dir is not None:
        out.append(Path(index_dir) / EXPORT_SUBDIR)
    if identity.name.startswith("local-dir:"):
        out.append(Path(identity.name.removeprefix("local-dir:")) / EXPORT_SUBDIR)
    out.append(cache_dir(identity))
    return out


def find_onnx_encoder(index_dir: str | Path | None, identity: ModelIdentity):
    """(OnnxEncoder, None) for the first usable export, or (None, why not) in one sentence."""
    from retriever.onnx.runtime import ExportUnusable, OnnxEncoder

    reasons = []
    for folder in export_candidates(index_dir, identity):
        if not (folder / EXPORT_JSON).is_file():
            continue
        try:
            return OnnxEncoder(folder, identity), None
        except ExportUnusable as e:
            reasons.append(str(e))
    if reasons:
        return None, "; ".join(reasons)
    where = " or ".join(str(p) for p in export_candidates(index_dir, identity))
    return None, f"no ONNX export of the index's model in {where}"


class TorchQueryEncoder:
    """The torch path behind the same two methods as OnnxEncoder (retriever.models.encode)."""

    backend = "torch"

    def __init__(self, encoder):
        self.encoder = encoder
        self.identity = encoder.identity

    def describe(self) -> str:
        return "torch"

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        from retriever.models.encode import encode_texts

        return encode_texts(self.encoder, texts, batch_size)

    def encode_images(
        self, images: Iterable, batch_size: int = 32, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        from retriever.models.encode import encode_images

        return encode_images(self.encoder, images, batch_size, max_pixels)


class QueryEncoder:
    """ONNX first, torch when ONNX cannot serve; `note` says in one sentence why torch was used.

    Parameters: `onnx` an OnnxEncoder or None, `load_torch` builds the torch LoadedModel on demand,
    `strict` (backend "onnx") turns any ONNX failure into a UserError instead of a fallback,
    `note` the reason ONNX is already known to be unusable.
    """

    def __init__(self, onnx, load_torch: Callable[[], object], *, strict: bool = False, note: str | None = None):
        self._onnx = onnx
        self._load_torch = load_torch
        self._torch: TorchQueryEncoder | None = None
        self.strict = strict
        self.note = note

    @property
    def backend(self) -> str:
        return "onnx" if self._onnx is not None else "torch"

    def torch_encoder(self) -> TorchQueryEncoder:
        if self._torch is None:
            self._torch = TorchQueryEncoder(self._load_torch())
        return self._torch

    def _fall_back(self, why: str) -> None:
        if self.strict:
            raise UserError(f"--backend onnx was asked for, but {why}.")
        self._onnx = None
        self.note = f"Using torch for queries: {why}."
        log.warning(self.note)

    def _call(self, method: str, *args, **kwargs) -> np.ndarray:
        from retriever.onnx.runtime import ExportUnusable

        if self._onnx is not None:
            try:
                return getattr(self._onnx, method)(*args, **kwargs)
            except ExportUnusable as e:
                self._fall_back(str(e))
        return getattr(self.torch_encoder(), method)(*args, **kwargs)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self._call("encode_texts", texts, batch_size)

    def encode_images(
        self, images: Iterable, batch_size: int = 32, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> np.ndarray:
        return self._call("encode_images", images, batch_size, max_pixels)

    def prepare(self, tower: str | None = None) -> QueryEncoder:
        """Load sessions (or the torch model) now, so that failures and fallbacks happen here."""
        from retriever.onnx.runtime import ExportUnusable

        if self._onnx is not None:
            try:
                self._onnx.load(tower)
                return self
            except ExportUnusable as e:
                self._fall_back(str(e))
        self.torch_encoder()
        return self


def open_query_encoder(
    index_dir: str | Path | None,
    identity: ModelIdentity,
    load_torch: Callable[[], object],
    backend: str = "auto",
) -> QueryEncoder:
    """The query encoder for an index of `identity`'s vectors under `backend` (auto, onnx, torch)."""
    if backend not in BACKENDS:
        raise UserError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "torch":
        return QueryEncoder(None, load_torch)
    onnx, why = find_onnx_encoder(index_dir, identity)
    if onnx is None:
        if backend == "onnx":
            raise UserError(f"--backend onnx was asked for, but there is {why}; run `retriever export-onnx`.")
        q = QueryEncoder(None, load_torch, note=f"Using torch for queries: {why}.")
        log.warning(q.note)
        return q
    return QueryEncoder(onnx, load_torch, strict=backend == "onnx")
