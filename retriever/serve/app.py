"""The FastAPI application: `create_app(ServeConfig(...))`.

Routes: the native API under /v1, /healthz, /metrics, the web page at / (files in ./static), and
clip-retrieval's routes (compat.py). One ASGI guard in front of everything enforces the API key,
the upload cap and security headers, and records metrics; exception handlers turn every failure
into a JSON body with one sentence, never a stack trace.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import math
import re
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi import Query as QueryParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from retriever.errors import UserError
from retriever.indexes.rows import json_value
from retriever.serve.config import ServeConfig
from retriever.serve.images import THUMB_SIZES, BadImage, ThumbnailCache
from retriever.serve.metrics import Metrics
from retriever.serve.query import MAX_K, ItemNotFound, Query, Searcher, expression_from_request
from retriever.serve.state import IndexNotFound, ModelCache, Registry, ServedIndex

log = logging.getLogger("retriever.serve")
STATIC = Path(__file__).parent / "static"
OPEN_PATHS = ("/healthz", "/", "/favicon.ico")  # reachable without the key: no data behind them
SESSION_COOKIE = "retriever_session"


class BodyTooLarge(StarletteHTTPException):
    """Raised while reading a body past the cap; an HTTPException so FastAPI's body parsing lets it through."""

    def __init__(self):
        super().__init__(413, "The request is larger than this server's upload limit.")


# ---------------------------------------------------------------- request / response models


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: str | None = Field(None, description="Index name (default: the first served).")
    text: str | None = Field(None, max_length=10_000, description="Text query.")
    image: str | None = Field(None, description="Base64 image bytes (PNG, JPEG, WebP, GIF, BMP).")
    image_url: str | None = Field(
        None, max_length=2048, description="An image URL, fetched only by a server started with --allow-image-urls."
    )
    id: int | None = Field(None, description="More like this: the id of an indexed item.")
    vector: list[float] | None = Field(None, max_length=65_536, description="A query vector of the index's dimension.")
    modality: Literal["image", "text"] = Field("image", description="What to retrieve: images or captions.")
    k: int = Field(10, ge=1, le=MAX_K, description=f"Number of hits, 1..{MAX_K}.")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Drop hits scoring below this cosine.")
    terms: list[dict[str, Any]] | None = Field(
        None,
        max_length=64,
        description='More terms, as in `Query.from_dict`: [{"text"|"image" (base64)|"id": ..., "weight": 1, '
        '"negative": false}]; the query vector is the weighted sum, negatives subtracted.',
    )
    where: str | None = Field(
        None, max_length=10_000, description='SQL condition over the index\'s columns, e.g. "year >= 2020".'
    )
    dedup: float | None = Field(None, ge=-1.0, le=1.0, description="Fold hits within this cosine of a better hit.")
    keep_query: bool = Field(False, description="Keep the query's own images and items in the hits.")

    def expression(self) -> bool:
        """Whether the request uses issue 12's query language (terms or options the batcher lacks)."""
        return bool(self.terms) or self.where is not None or self.dedup is not None or self.keep_query


class Hit(BaseModel):
    rank: int
    id: int
    score: float
    caption: str | None
    metadata: dict
    image_url: str
    thumbnail_url: str
    absorbed: int = 0


class SearchReport(BaseModel):
    filter_strategy: str
    matching_rows: int | None
    below_min_score: int
    folded_duplicates: int
    excluded_query_items: int


class SearchResponse(BaseModel):
    index: str
    modality: str
    query: str
    k: int
    took_ms: float
    hits: list[Hit]
    report: SearchReport | None = None


class ErrorBody(BaseModel):
    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Bad request (one sentence)"},
    401: {"model": ErrorBody},
    404: {"model": ErrorBody},
    413: {"model": ErrorBody},
    422: {"model": ErrorBody},
}


def hit_json(served: ServedIndex, h) -> dict:
    base = f"/v1/indexes/{served.name}/items/{h.id}"
    return {
        "rank": h.rank,
        "id": h.id,
        "score": round(float(h.score), 6),
        "caption": h.caption,
        "metadata": item_metadata(h),
        "image_url": f"{base}/image",
        "thumbnail_url": f"{base}/thumbnail",
        "absorbed": h.absorbed,
    }


def item_metadata(h) -> dict:
    """What an item tells about itself: its metadata columns and the file's name, never its full
    path on the server."""
    meta = {key: json_value(v) for key, v in h.metadata.items()}
    meta["filename"] = Path(h.path).name if h.path else None
    return meta


# ---------------------------------------------------------------- the guard


class Guard:
    """API key, upload cap, security headers and metrics for every HTTP request (pure ASGI)."""

    def __init__(self, app, *, api_key: str | None, max_upload: int, metrics: Metrics):
        self.app = app
        self.key = api_key.encode() if api_key else None
        self.session = session_token(api_key) if api_key else None
        self.max_upload = max_upload
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status_box = [500]
        started = [False]

        async def send_wrapped(message):
            if message["type"] == "http.response.start":
                started[0] = True
                status_box[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                message = {**message, "headers": headers}
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            path = scope.get("path", "")
            if self.key is not None and scope.get("method") != "OPTIONS" and not _open_path(path):
                if not self._authorized(headers):
                    return await _send_json(
                        send_wrapped,
                        401,
                        "This server needs an API key: send Authorization: Bearer KEY.",
                        [(b"www-authenticate", b"Bearer")],
                    )
            length = headers.get(b"content-length")
            if length is not None:
                try:
                    too_big = int(length) > self.max_upload
                except ValueError:
                    return await _send_json(send_wrapped, 400, "The Content-Length header is not a number.")
                if too_big:
                    return await _send_json(send_wrapped, 413, self._too_large())
            received = [0]

            async def receive_capped():
                message = await receive()
                if message["type"] == "http.request":
                    received[0] += len(message.get("body", b""))
                    if received[0] > self.max_upload:
                        raise BodyTooLarge()
                return message

            try:
                await self.app(scope, receive_capped, send_wrapped)
            except BodyTooLarge:
                if not started[0]:
                    await _send_json(send_wrapped, 413, self._too_large())
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or (
                "/static" if scope.get("path", "").startswith("/static/") else "unmatched"
            )
            self.metrics.observe(scope.get("method", ""), label, status_box[0], time.perf_counter() - start)

    def _authorized(self, headers: dict) -> bool:
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer " and hmac.compare_digest(auth[7:].strip(), self.key):
            return True
        cookie = _cookie(headers.get(b"cookie", b""), SESSION_COOKIE)
        return cookie is not None and self.session is not None and hmac.compare_digest(cookie, self.session)

    def _too_large(self) -> str:
        return f"The request is larger than this server's upload limit of {_human(self.max_upload)}."


def session_token(api_key: str) -> str:
    """What the page's cookie holds: derived from the key, so the key itself never sits in a cookie."""
    return hmac.new(api_key.encode(), b"retriever-web-session", hashlib.sha256).hexdigest()


def _open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith("/static/")


def _cookie(raw: bytes, name: str) -> str | None:
    for part in raw.decode("latin-1").split(";"):
        k, _, v = part.strip().partition("=")
        if k == name:
            return v
    return None


def _human(size: int) -> str:
    n = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


async def _send_json(send, status: int, error: str, headers=()):
    import json

    body = json.dumps({"error": error}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------- the app


def create_app(config: ServeConfig) -> FastAPI:
    """Open every index (loading each model once) and return the application."""
    models = ModelCache(config.model, config.backend)
    registry = Registry(models)
    for name, path in config.indexes:
        registry.add(name, Path(path))
    searcher = Searcher(config.batching, config.batch_window_ms)
    metrics = Metrics()
    thumbs = ThumbnailCache()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.create_task(_watch(registry, config.watch_seconds)) if config.watch_seconds > 0 else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            for served in registry.all():
                for b in served.batchers.values():
                    await b.close()

    app = FastAPI(
        title="retriever",
        version=_version(),
        summary="Text and image search over retriever indexes.",
        lifespan=lifespan,
    )
    app.state.registry = registry
    app.state.searcher = searcher
    app.state.config = config
    app.state.metrics = metrics
    _install_error_handlers(app)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        return {"status": "ok", "indexes": len(registry.names())}

    @app.get("/metrics", tags=["service"], response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        vectors = {}
        for s in registry.all():
            for mod, e in s.retriever.manifest.indexes.items():
                vectors[(("index", s.name), ("modality", mod))] = e.count
        batches = {
            (("kind", "batches"),): searcher.encoder_passes,
            (("kind", "texts"),): searcher.texts,
        }
        text = metrics.render(
            {
                "retriever_index_vectors": ("Vectors per index and modality.", vectors),
                "retriever_text_encoder_total": ("Text encoder passes (batches) and texts encoded.", batches),
                "retriever_index_generation": (
                    "How many times each index was (re)loaded.",
                    {(("index", s.name),): s.generation for s in registry.all()},
                ),
            }
        )
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/indexes", tags=["indexes"])
    def list_indexes() -> dict:
        """Every served index: counts, modalities, model identity, index type and tuned parameters."""
        return {"indexes": [s.describe() for s in registry.all()], "max_k": MAX_K}

    @app.get("/v1/indexes/{name}", tags=["indexes"], responses=ERRORS)
    def get_index(name: str) -> dict:
        return registry.get(name).describe()

    @app.post("/v1/indexes/{name}/reload", tags=["indexes"], responses=ERRORS)
    async def reload_index(name: str) -> dict:
        """Reopen the index from its folder; a broken folder keeps the current one serving."""
        registry.get(name)
        changed, message = await asyncio.get_running_loop().run_in_executor(None, registry.reload, name, True)
        return {"index": name, "reloaded": changed, "message": message, "generation": registry.get(name).generation}

    @app.get("/v1/indexes/{name}/items/{item_id}", tags=["items"], responses=ERRORS)
    def get_item(name: str, item_id: int) -> dict:
        served = registry.get(name)
        h = served.item(item_id)
        if h is None:
            raise ItemNotFound(f"Index {name!r} has no item {item_id}.")
        h.score = float("nan")
        out = hit_json(served, h)
        out.pop("score")
        out.pop("rank")
        return out

    @app.get("/v1/indexes/{name}/items/{item_id}/image", tags=["items"], responses=ERRORS)
    def get_item_image(name: str, item_id: int) -> FileResponse:
        """The original image file of an item."""
        path = _served_file(registry.get(name), item_id)
        return FileResponse(path, headers={"cache-control": "private, max-age=3600"})

    @app.get("/v1/indexes/{name}/items/{item_id}/thumbnail", tags=["items"], responses=ERRORS)
    def get_item_thumbnail(
        name: str, item_id: int, size: int = QueryParam(256, ge=THUMB_SIZES[0], le=THUMB_SIZES[1])
    ) -> Response:
        """The image resized to fit size x size pixels, upright (EXIF orientation applied), cached."""
        served = registry.get(name)
        path = _served_file(served, item_id)
        data, media = thumbs.get((served.name, served.generation, item_id, size), path, size)
        return Response(data, media_type=media, headers={"cache-control": "private, max-age=3600"})

    @app.post("/v1/search", tags=["search"], responses=ERRORS, response_model=SearchResponse)
    async def search(req: SearchRequest, request: Request) -> dict:
        """Search by `text`, `image` (base64), `id` (more like this) or `vector`: exactly one."""
        image = None
        if req.image is not None:
            try:
                image = base64.b64decode(_strip_data_url(req.image), validate=True)
            except (binascii.Error, ValueError):
                raise BadImage("The image field is not valid base64.") from None
        if req.image_url is not None:
            if image is not None:
                raise UserError("Give exactly one query: text, image, id or vector.")
            image = await image_from_url(config, registry, str(request.base_url), req.image_url)
        if req.expression():
            if req.vector is not None:
                raise UserError("A vector query takes no terms, where, dedup or keep_query; send text, image or id.")
            body = req.model_dump(include={"text", "id", "terms", "k", "modality", "where", "min_score", "dedup"})
            body["keep_query"] = req.keep_query
            return await _run_expression(registry.get(req.index), body, image)
        q = Query(text=req.text, image=image, item_id=req.id, vector=req.vector)
        return await _run_search(registry.get(req.index), q, req.k, req.modality, req.min_score)

    async def _run_expression(served: ServedIndex, body: dict, image: bytes | None) -> dict:
        """A query of the query language (a /v1/search body's shape), answered by `Retriever.search`."""
        q = expression_from_request(body, image)
        t0 = time.perf_counter()
        hits = await searcher.search_expression(served, q)
        report = hits.report.to_dict()
        return {
            "index": served.name,
            "modality": q.modality,
            "query": "terms",
            "k": q.k,
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
            "hits": [hit_json(served, h) for h in hits],
            "report": {key: report[key] for key in SearchReport.model_fields},
        }

    @app.post(
        "/v1/search/image",
        tags=["search"],
        responses=ERRORS,
        response_model=SearchResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "index": {"type": "string"},
                                "modality": {"type": "string", "enum": ["image", "text"]},
                                "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
                                "min_score": {"type": "number", "minimum": -1, "maximum": 1},
                                "text": {
                                    "type": "array",
                                    "items": {"type": "string", "maxLength": 10_000},
                                    "description": "Text added to the image (a term of weight 1); repeatable.",
                                },
                                "not_text": {
                                    "type": "array",
                                    "items": {"type": "string", "maxLength": 10_000},
                                    "description": "Text subtracted from the image (a negative term); repeatable.",
                                },
                                "where": {"type": "string", "maxLength": 10_000, "description": "SQL condition."},
                                "dedup": {"type": "number", "minimum": -1, "maximum": 1},
                                "keep_query": {"type": "boolean"},
                            },
                        }
                    }
                },
            }
        },
    )
    async def search_image(request: Request) -> dict:
        """Search with an uploaded image (multipart field `file`), for the web page and curl. The query
        language's options ride along as form fields: `text` (added) and `not_text` (subtracted), both
        repeatable, `where`, `dedup`, `keep_query`; with any of them the library answers, as for
        /v1/search with `terms`."""
        try:
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
        except BodyTooLarge:
            raise
        except Exception:  # noqa: BLE001 (malformed multipart is the client's error)
            raise UserError("Send the image as multipart/form-data with a field named file.") from None
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise UserError("Send the image as multipart/form-data with a field named file.")
        data = await upload.read()
        k = _form_int(form.get("k"), "k", 10)
        if not 1 <= k <= MAX_K:
            raise KTooLarge(f"k must be between 1 and {MAX_K}.")
        modality = form.get("modality") or "image"
        if modality not in ("image", "text"):
            raise UserError("modality must be image or text.")
        min_score = _form_float(form.get("min_score"), "min_score")
        index = form.get("index")
        served = registry.get(index if isinstance(index, str) and index else None)
        body = expression_form(form)
        if body is None:
            return await _run_search(served, Query(image=data), k, modality, min_score)
        body.update(k=k, modality=modality, min_score=min_score)
        return await _run_expression(served, body, data)

    async def _run_search(served: ServedIndex, q: Query, k: int, modality: str, min_score: float | None) -> dict:
        t0 = time.perf_counter()
        hits = await searcher.search(served, q, k, modality, min_score)
        return {
            "index": served.name,
            "modality": modality,
            "query": q.kind.replace("item_id", "id"),
            "k": k,
            "took_ms": round((time.perf_counter() - t0) * 1000, 3),
            "hits": [hit_json(served, h) for h in hits],
        }

    @app.post("/v1/session", tags=["service"], include_in_schema=False)
    def session(request: Request) -> Response:
        """The web page trades the key (already checked by the guard) for a same-site cookie, so
        that <img> tags load without sending the key in URLs."""
        resp = JSONResponse({"ok": True})
        if config.api_key:
            resp.set_cookie(SESSION_COOKIE, session_token(config.api_key), httponly=True, samesite="strict")
        return resp

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> FileResponse:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    from retriever.serve.compat import add_compat_routes

    add_compat_routes(app, registry, searcher, config)

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Guard, api_key=config.api_key, max_upload=config.max_upload, metrics=metrics)
    return app


PAGE_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
    "script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "cache-control": "no-cache",
}


MAX_FORM_FIELDS = 80  # file, index, modality, k, min_score, where, dedup, keep_query and up to 64 text terms
MAX_TEXT = 10_000  # characters in one text term or where condition, as in the JSON API


def expression_form(form) -> dict | None:
    """The query-language part of a /v1/search/image form as a /v1/search body (`terms`, `where`,
    `dedup`, `keep_query`), or None when the form has none of it (a plain image search)."""
    terms: list[dict[str, Any]] = []
    for key, negative in (("text", False), ("not_text", True)):
        for value in form.getlist(key):
            text = _form_text(value, key)
            if text is not None:
                terms.append({"text": text.strip(), "negative": negative})
    where = _form_text(form.get("where"), "where")
    dedup = _form_float(form.get("dedup"), "dedup")
    if dedup is not None and not -1 <= dedup <= 1:
        raise KTooLarge("dedup must be between -1 and 1.")
    keep_query = _form_bool(form.get("keep_query"), "keep_query")
    if not terms and where is None and dedup is None and not keep_query:
        return None
    return {"terms": terms, "where": where, "dedup": dedup, "keep_query": keep_query}


def _form_text(value, name: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise UserError(f"{name} must be a text field, not a file.")
    if len(value) > MAX_TEXT:
        raise KTooLarge(f"{name} must be at most {MAX_TEXT} characters.")
    return value


def _form_bool(value, name: str) -> bool:
    if value in (None, ""):
        return False
    if isinstance(value, str) and value.lower() in ("true", "1", "on", "yes"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "off", "no"):
        return False
    raise UserError(f"{name} must be true or false.")


class KTooLarge(UserError):
    """k out of range (422, like the JSON API's validation)."""


OWN_ITEM_IMAGE = re.compile(r"/v1/indexes/([^/]+)/items/(-?[0-9]+)/(?:image|thumbnail)")


def own_item(registry: Registry, base_url: str, url: str) -> tuple[ServedIndex, int] | None:
    """(index, id) when `url` is this server's own image or thumbnail URL of an item, as its hits hand
    them out; None for any other URL. The clip front's "similar" button sends a hit's `url` back as
    `image_url`: the server answers that from the index and fetches nothing, so it needs neither
    --allow-image-urls nor an exception to the no-loopback rule."""
    try:
        parts, base = urlsplit(url), urlsplit(base_url)
    except ValueError:
        return None
    prefix = base.path.rstrip("/")
    if (parts.scheme, parts.netloc.lower()) != (base.scheme, base.netloc.lower()) or not parts.path.startswith(prefix):
        return None
    match = OWN_ITEM_IMAGE.fullmatch(unquote(parts.path[len(prefix) :]))
    if match is None:
        return None
    return registry.get(match[1]), int(match[2])


async def image_from_url(config: ServeConfig, registry: Registry, base_url: str, url: str) -> bytes:
    """The image bytes an `image_url` query names: an item of this server read from its file, else
    the URL fetched when the operator allowed that (a 400 sentence otherwise)."""
    item = own_item(registry, base_url, url)
    if item is None:
        return await fetch_if_allowed(config, url)
    served, item_id = item
    return await asyncio.get_running_loop().run_in_executor(None, _served_file(served, item_id).read_bytes)


async def fetch_if_allowed(config: ServeConfig, url: str) -> bytes:
    """The image at `url` when the operator allowed URL fetching; a 400 sentence otherwise."""
    from retriever.serve.fetch import UrlRefused, fetch_image_url

    if not config.allow_image_urls:
        raise UrlRefused("This server does not fetch image URLs; send the image itself, base64-encoded, as image.")
    return await asyncio.get_running_loop().run_in_executor(None, fetch_image_url, url, config.max_upload)


def _served_file(served: ServedIndex, item_id: int) -> Path:
    path = served.file_of(item_id)
    if path is None:
        raise ItemNotFound(f"Index {served.name!r} has no image for item {item_id}.")
    return path


def _strip_data_url(s: str) -> str:
    return s.split(",", 1)[1] if s.startswith("data:") and "," in s else s


def _form_int(value, name: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise KTooLarge(f"{name} must be an integer.") from None


def _form_float(value, name: str) -> float | None:
    if value in (None, ""):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise KTooLarge(f"{name} must be a number.") from None
    if not math.isfinite(number):
        raise KTooLarge(f"{name} must be a finite number.")
    return number


def _install_error_handlers(app: FastAPI) -> None:
    def err(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError):
        return err(422, _one_sentence(exc.errors()))

    def says(status: int):
        async def handler(_: Request, exc: Exception):
            return err(status, str(exc))

        return handler

    # Errors whose message is already the sentence to show.
    for exc_type, status in ((IndexNotFound, 404), (ItemNotFound, 404), (KTooLarge, 422), (UserError, 400)):
        app.add_exception_handler(exc_type, says(status))

    @app.exception_handler(BodyTooLarge)
    async def too_large(_: Request, exc: BodyTooLarge):
        return err(
            413, f"The request is larger than this server's upload limit of {_human(app.state.config.max_upload)}."
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        message = {404: "Not found.", 405: "Method not allowed."}.get(exc.status_code, str(exc.detail))
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, exc: Exception):
        log.exception("Unhandled error while serving a request")
        return err(500, "Internal error; the server log has the details.")


def _one_sentence(errors) -> str:
    if not errors:
        return "The request is not valid."
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path"))
    msg = str(e.get("msg", "is not valid"))
    return f"{where or 'The request'}: {msg}." if not msg.endswith(".") else f"{where or 'The request'}: {msg}"


async def _watch(registry: Registry, every: float) -> None:
    """Reload an index whose manifest changed (after `retriever index --add` swapped the folder)."""
    from retriever.serve.state import manifest_signature

    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(every)
        for served in registry.all():
            if manifest_signature(served.path) not in ((), served.signature):
                try:
                    await loop.run_in_executor(None, registry.reload, served.name, False)
                except Exception:  # noqa: BLE001 (the watcher must outlive any one failure)
                    log.exception("Index watcher failed")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("retriever")
    except Exception:  # noqa: BLE001
        return "0"
