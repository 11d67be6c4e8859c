"""clip-retrieval's HTTP API (clip_back.py, 2.45) on top of retriever's indexes, at the wire level.

Its clients send JSON with no Content-Type (`ClipClient`, via requests' `data=`) or as text/plain
(the front's `fetch`), so these routes read and parse the raw body themselves.

Field by field (request of POST /knn-service):
  text | image (base64) | embedding_input   the query; "" counts as absent, as in clip_back
  image_url                                 this server's own item URL (a hit's `url`, which the front's
                                            "similar" button sends back): answered from the index, no
                                            fetch; any other URL is fetched only with
                                            --allow-image-urls (public addresses, timeout, size cap:
                                            serve/fetch.py), otherwise 400
  modality ("image" | "text"), indice_name  as clip_back (indice_name defaults to the first index)
  num_images, num_result_ids                as clip_back: num_result_ids hits are returned, the first
                                            num_images with metadata; both clamped to MAX_K
  deduplicate                               as clip_back: near-identical vectors (cosine >= 0.94)
                                            are dropped when the index can return stored vectors
  use_safety_model, use_violence_detector,
  aesthetic_score, aesthetic_weight,
  use_mclip                                 accepted and ignored, as clip_back does when it was
                                            started without those models
  terms, where                              retriever's extras (its clients never send them): more
                                            query terms ([{"text"|"image"|"id", "weight", "negative"}])
                                            and a SQL condition, answered by Retriever.search with the
                                            clip query as the first term; same response shape
Each hit: {"id": global id, "similarity": cosine, "caption": ..., "url": absolute URL of the item's
image on this server}. POST /metadata answers [{"id", "metadata": {"caption", "url"}}].
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from retriever.errors import UserError
from retriever.serve.images import BadImage
from retriever.serve.query import MAX_K, Query, Searcher, expression_from_request, item_query_vector
from retriever.serve.state import Registry, ServedIndex

DEDUP_THRESHOLD = 0.94  # clip_back's get_non_uniques threshold
EXTRAS = ("terms", "where")  # retriever's query language, which clip-retrieval's clients never send


async def read_json_body(request: Request) -> dict:
    """The body as a JSON object whatever the Content-Type says (none, text/plain, application/json)."""
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UserError("The body is not JSON.") from None
    if not isinstance(data, dict):
        raise UserError("The body must be a JSON object.")
    return data


def add_compat_routes(app: FastAPI, registry: Registry, searcher: Searcher, config) -> None:
    @app.get("/indices-list", include_in_schema=False)
    def indices_list() -> list[str]:
        return registry.names()

    @app.get("/config.json", include_in_schema=False)
    def config_json(request: Request) -> dict:
        return {
            "defaultBackend": str(request.base_url).rstrip("/"),
            "defaultIndex": registry.names()[0],
            "urlColumn": "url",
        }

    @app.post("/knn-service", include_in_schema=False)
    async def knn_service(request: Request) -> JSONResponse:
        body = await read_json_body(request)
        served = registry.get(_opt_str(body, "indice_name"))
        modality = body.get("modality", "image")
        if modality not in ("image", "text"):
            raise UserError("modality must be image or text.")
        num_images = _count(body, "num_images", 40)
        num_result_ids = _count(body, "num_result_ids", num_images)
        extras = {key: body[key] for key in EXTRAS if body.get(key) is not None}
        url = body.get("image_url")
        if url and body.get("text") in (None, "") and body.get("image") in (None, ""):
            if not isinstance(url, str):
                raise UserError("image_url must be a string.")
            q = await _url_query(served, str(request.base_url), url, as_item=bool(extras))
        else:
            q = _query(body)
        want = max(num_images, num_result_ids)
        if extras:
            lib_query = expression_from_request(_expression_body(q, extras, want, modality, body), q.image)
            hits = list(await searcher.search_expression(served, lib_query))
        else:
            hits = await searcher.search(served, q, want, modality)
            if body.get("deduplicate"):
                hits = await asyncio.get_running_loop().run_in_executor(None, _dedup, served, modality, hits)
        base = str(request.base_url).rstrip("/")
        out = []
        for i, h in enumerate(hits):
            row = _meta(served, base, h) if i < num_images else {}
            row["id"] = h.id
            row["similarity"] = float(h.score)
            out.append(row)
        return JSONResponse(out)

    @app.post("/metadata", include_in_schema=False)
    async def metadata(request: Request) -> JSONResponse:
        body = await read_json_body(request)
        ids = body.get("ids")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise UserError("ids must be a list of integer ids.")
        if not ids:
            return JSONResponse([])
        if len(ids) > MAX_K:
            raise UserError(f"Ask for at most {MAX_K} ids at once.")
        served = registry.get(_opt_str(body, "indice_name"))
        base = str(request.base_url).rstrip("/")
        out = []
        for i in ids:
            h = served.item(i)
            out.append({"id": i, "metadata": _meta(served, base, h) if h is not None else {}})
        return JSONResponse(out)

    async def _url_query(served: ServedIndex, base_url: str, url: str, as_item: bool = False) -> Query:
        """The query of an image_url. The front's "similar" button sends back a hit's own `url`: an
        item of the searched index is searched with its stored vector (what clip_back gets by
        encoding the downloaded image, the item itself included); other URLs go through
        `image_from_url` (this server's files, or a fetch only with --allow-image-urls)."""
        from retriever.serve.app import image_from_url, own_item

        item = own_item(registry, base_url, url)
        if item is not None and item[0] is served:
            if as_item:  # an id term for the query language, which keeps the item itself
                return Query(item_id=item[1])
            loop = asyncio.get_running_loop()
            vec = await loop.run_in_executor(None, item_query_vector, served, item[1])
            return Query(vector=vec[0].tolist(), vector_of="image")  # an item's image vector
        return Query(image=await image_from_url(config, registry, base_url, url))


def _expression_body(q: Query, extras: dict, k: int, modality: str, body: dict) -> dict:
    """A /v1/search-shaped body for a /knn-service request that carries retriever's extras: the clip
    query as the first term, `deduplicate` as the library's dedup at clip_back's threshold, and
    the query's own items kept in the hits, as clip_back keeps them."""
    if q.vector is not None:
        raise UserError("embedding_input takes no terms or where; send text or image with them.")
    first = {"text": q.text} if q.text is not None else {"id": q.item_id} if q.item_id is not None else {}
    return {
        **first,
        **extras,
        "k": k,
        "modality": modality,
        "dedup": DEDUP_THRESHOLD if body.get("deduplicate") else None,
        "keep_query": True,
    }


def _meta(served: ServedIndex, base: str, h) -> dict:
    meta = {"url": f"{base}/v1/indexes/{served.name}/items/{h.id}/image"}
    if h.caption is not None:
        meta["caption"] = h.caption
    return meta


def _opt_str(body: dict, key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise UserError(f"{key} must be a string.")
    return v or None


def _count(body: dict, key: str, default: int) -> int:
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise UserError(f"{key} must be a number.")
    try:
        n = int(v)
    except ValueError:
        raise UserError(f"{key} must be a number.") from None
    if n < 1:
        raise UserError(f"{key} must be at least 1.")
    return min(n, MAX_K)


def _query(body: dict) -> Query:
    text = body.get("text")
    image = body.get("image")
    vector = body.get("embedding_input")
    if text not in (None, ""):
        if not isinstance(text, str):
            raise UserError("text must be a string.")
        return Query(text=text)
    if image not in (None, ""):
        if not isinstance(image, str):
            raise UserError("image must be a base64 string.")
        try:
            return Query(image=base64.b64decode(image.split(",", 1)[-1], validate=True))
        except (binascii.Error, ValueError):
            raise BadImage("The image field is not valid base64.") from None
    if vector is not None:
        if not isinstance(vector, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector
        ):
            raise UserError("embedding_input must be a list of numbers.")
        return Query(vector=[float(x) for x in vector])
    raise UserError("Give one of text, image or embedding_input.")


def _dedup(served: ServedIndex, modality: str, hits: list) -> list:
    """Drop hits whose stored vector is within DEDUP_THRESHOLD cosine of a better-ranked kept hit."""
    if len(hits) < 2:
        return hits
    ids, rows = served._modality_ids(modality)
    pos = np.searchsorted(ids, [h.id for h in hits])
    index = served.retriever._index(modality)
    try:
        vecs = np.stack([index.reconstruct(int(rows[p])) for p in pos]).astype(np.float32)
    except RuntimeError:  # the index cannot give vectors back: keep every hit
        return hits
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    kept: list[int] = []
    for i in range(len(hits)):
        if not kept or float(np.max(vecs[kept] @ vecs[i])) < DEDUP_THRESHOLD:
            kept.append(i)
    return [hits[i] for i in kept]
