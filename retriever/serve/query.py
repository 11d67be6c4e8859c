"""From a request's query (text, image bytes, item id or vector) to ranked hits: the one adapter
between the HTTP layer and `Retriever`. Query expressions and filters plug in here."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from retriever.errors import UserError
from retriever.query import Query as LibQuery
from retriever.search import Hits, SearchResult
from retriever.serve.batching import Batcher
from retriever.serve.images import BadImage, decode_upload
from retriever.serve.state import ServedIndex

MAX_K = 1000  # largest k the native API accepts (422 above); the clip-retrieval routes clamp to it


class ItemNotFound(UserError):
    """An id that is not in the index (404)."""


@dataclass
class Query:
    """Exactly one of text, image (raw bytes), item_id, vector."""

    text: str | None = None
    image: bytes | None = None
    item_id: int | None = None
    vector: list[float] | None = None
    vector_of: str | None = None  # the modality a vector came from ("image"), when the server knows it

    @property
    def kind(self) -> str:
        given = [n for n in ("text", "image", "item_id", "vector") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UserError("Give exactly one query: text, image, id or vector.")
        return given[0]


class Searcher:
    """Encodes queries and runs faiss off the event loop; text queries go through one batcher per
    (index, modality), so concurrent ones share an encoder pass and a faiss call."""

    def __init__(self, batching: bool = True, window_ms: float = 3.0, max_batch: int = 64):
        self.batching = batching
        self.window_ms = window_ms
        self.max_batch = max_batch
        self.encoder_passes = 0  # text batches encoded (one pass each)
        self.texts = 0

    def batcher(self, served: ServedIndex, modality: str) -> Batcher:
        """The batcher lives on the ServedIndex, so it goes away with an index a reload replaced."""
        b = served.batchers.get(modality)
        if b is None:

            def process(items):
                self.encoder_passes += 1
                self.texts += len(items)
                return _text_batch(served, modality, items)

            b = served.batchers[modality] = Batcher(process, self.window_ms, self.max_batch, self.batching)
        return b

    async def vectors(self, served: ServedIndex, q: Query) -> np.ndarray:
        """The (1, d) query vector of an image, id or vector query."""
        kind = q.kind
        loop = asyncio.get_running_loop()
        if q.text is not None:
            return await loop.run_in_executor(None, served.retriever.query_encoder.encode_texts, [q.text])
        if q.image is not None:
            return await loop.run_in_executor(None, _encode_image_bytes, served, q.image)
        if q.item_id is not None:
            return await loop.run_in_executor(None, item_query_vector, served, q.item_id)
        assert kind == "vector"
        vec = np.asarray(q.vector, np.float32)
        dim = next(iter(served.retriever.manifest.indexes.values())).dim
        if vec.ndim != 1 or vec.shape[0] != dim:
            raise UserError(f"The vector must have {dim} numbers (this index's dimension); it has {vec.size}.")
        norm = float(np.linalg.norm(vec))
        if not np.isfinite(norm) or norm == 0:
            raise UserError("The vector must be finite and non-zero.")
        return (vec / norm)[None, :]

    async def search(
        self, served: ServedIndex, q: Query, k: int, modality: str, min_score: float | None = None
    ) -> list[SearchResult]:
        """Top-k hits of `modality`'s index above min_score; an id query leaves out the item itself."""
        if modality not in served.retriever.modalities:
            raise UserError(
                f"Index {served.name!r} has no {modality} index; it has {', '.join(served.retriever.modalities)}."
            )
        if q.kind == "text" and q.text is not None:
            if not q.text.strip():
                raise UserError("The text query is empty.")
            hits = await self.batcher(served, modality).submit((q.text, k))
        else:
            vec = await self.vectors(served, q)
            extra = 1 if q.item_id is not None else 0
            loop = asyncio.get_running_loop()
            # An image or an item (searched with its image vector) may use the querybank; a raw vector
            # is of no known modality.
            of = "image" if q.image is not None or q.item_id is not None else q.vector_of
            hits = await loop.run_in_executor(None, _search_one, served, vec, k + extra, modality, of)
            if q.item_id is not None:
                hits = [h for h in hits if h.id != q.item_id][:k]
        if min_score is not None:
            hits = [h for h in hits if h.score >= min_score]
        for rank, h in enumerate(hits, 1):
            h.rank = rank
        return hits

    async def search_expression(self, served: ServedIndex, q: LibQuery) -> Hits:
        """A query of issue 12's language (weighted/negative terms, where, dedup, keep_query), answered
        by the library's `Retriever.search` off the event loop: not batched, since its options differ."""
        if q.modality not in served.retriever.modalities:
            raise UserError(
                f"Index {served.name!r} has no {q.modality} index; it has {', '.join(served.retriever.modalities)}."
            )
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, served.retriever.search, q)
        except UserError as e:  # the library words filters for the CLI's --where
            e.args = (str(e).replace("--where filter", "where filter"),)
            raise


def expression_from_request(body: Mapping[str, Any], image: bytes | None = None) -> LibQuery:
    """A library `Query` from a /v1/search body (the `Query.from_dict` shape, `image` values in
    base64); `image`: the top-level image already decoded (or fetched from image_url).

    Every image term becomes a decoded picture here, so a request can never name a file on the server."""
    d = {key: v for key, v in body.items() if v is not None and key != "image"}
    if image is not None:
        d["terms"] = [{"image": "upload"}, *d.get("terms", [])]
    q = LibQuery.from_dict(d)
    terms = list(q.terms)
    uploads = iter([image] if image is not None else [])
    for i, t in enumerate(terms):
        if t.kind == "id" and not -(2**63) <= t.value < 2**63:  # faiss ids are int64
            raise ItemNotFound(f"No indexed item has id {t.value}.")
        if t.kind == "image":
            data = next(uploads, None)
            terms[i] = replace(t, value=decode_upload(data if data is not None else decode_base64(t.value)))
    return replace(q, terms=tuple(terms))


def decode_base64(value: str) -> bytes:
    """Image bytes from base64 (a data: URL prefix is allowed)."""
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadImage("An image in the query is not valid base64.") from None


def _text_batch(served: ServedIndex, modality: str, items: list[tuple[str, int]]) -> list[list[SearchResult]]:
    """One encoder pass and one faiss call for many (text, k) queries; each gets its own top k."""
    vecs = served.retriever.query_encoder.encode_texts([t for t, _ in items])
    top = max(k for _, k in items)
    per_query = served.retriever.search_vectors(vecs, top, modality, query_modality="text")
    return [hits[:k] for hits, (_, k) in zip(per_query, items)]


def _search_one(
    served: ServedIndex, vec: np.ndarray, k: int, modality: str, query_modality: str | None
) -> list[SearchResult]:
    return served.retriever.search_vectors(vec, k, modality, query_modality=query_modality)[0]


def _encode_image_bytes(served: ServedIndex, data: bytes) -> np.ndarray:
    return served.retriever.query_encoder.encode_images([decode_upload(data)])


def item_query_vector(served: ServedIndex, item_id: int) -> np.ndarray:
    """More like this: the item's stored image vector, else its image encoded again."""
    if served.row_of(item_id) is None:
        raise ItemNotFound(f"Index {served.name!r} has no item {item_id}.")
    for modality in ("image", "text"):
        vec = served.item_vector(item_id, modality)
        if vec is not None:
            return vec
    path = served.file_of(item_id)
    if path is None:
        raise ItemNotFound(f"Item {item_id} of index {served.name!r} has no readable image to search with.")
    return served.retriever.query_encoder.encode_images([path])
