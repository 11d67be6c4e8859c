"""Query an index: `Retriever(index_dir).search("a red apple")` or `.search(Query(...))`.

A thin layer over `indexes/open.py` (faiss index, re-rank store, filtered search) and
`indexes/rows.py` (the rows file): it turns a `Query` into one vector, asks the index for
candidates, and trims them (the query's own items, score floor, near-duplicates) to k hits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from retriever.data.limits import DEFAULT_MAX_PIXELS
from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.indexes.manifest import IndexManifest, ModalityIndex, read_index_manifest
from retriever.indexes.open import OpenIndex, RowFilter
from retriever.indexes.rows import BASE_COLUMNS, HIDDEN_COLUMNS, json_value
from retriever.indexes.settings import configure_faiss
from retriever.indexes.where import where_mask
from retriever.query import Query, QueryReport, Term, check_options

if TYPE_CHECKING:  # torch is imported only when a query has to be encoded
    from retriever.data.images import ImageInput
    from retriever.models.load import LoadedModel
    from retriever.onnx.choose import QueryEncoder


@dataclass(slots=True)
class SearchResult:
    """One hit: its rank (1 = best), row id, cosine score, image path, caption, metadata columns,
    and how many near-duplicates it absorbed (--dedup)."""

    rank: int
    id: int
    score: float  # cosine similarity (inner product of unit vectors)
    path: str
    caption: str | None
    metadata: dict[str, Any] = field(default_factory=dict)  # the row's metadata columns
    absorbed: int = 0  # near-duplicates folded into this hit (--dedup)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["metadata"] = {k: json_value(v) for k, v in self.metadata.items()}
        return d


class Hits(list):
    """A query's results (a list of SearchResult, best first) with what happened on the way."""

    def __init__(
        self, hits: Iterable[SearchResult] = (), report: QueryReport | None = None, query: Query | None = None
    ):
        super().__init__(hits)
        self.report = report or QueryReport()
        self.query = query

    def to_dict(self) -> dict:
        d: dict[str, Any] = {}
        if self.query is not None:
            if self.query.tag is not None:
                d["tag"] = self.query.tag
            d["query"] = self.query.to_dict()
        d["hits"] = [h.to_dict() for h in self]
        d.update(self.report.to_dict())
        return d


class QueryError(UserError):
    """A UserError about one query of a batch; `position` is its 0-based place in the batch."""

    def __init__(self, position: int, error: UserError):
        super().__init__(str(error))
        self.position = position


# Called with (queries_done, total).
BatchProgress = Callable[[int, int], None]
MASK_CACHE = 8  # filters remembered per Retriever (a batch usually repeats one)
# A querybank-ranked query fetches at least this many candidates by cosine, and keeps fetching
# (four times as many each round) until no row left behind could outrank its k-th hit, up to
# QUERYBANK_MAX_FETCH. Each round is a new faiss search, whose cost hardly depends on k: one
# round of 256 costs what one of 64 does (bench_search.py querybank).
QUERYBANK_MIN_FETCH = 256
QUERYBANK_MAX_FETCH = 4096


class Retriever:
    """An opened index folder plus the model its vectors came from. Use as a context manager or
    call `close()` to release the memory-mapped files.

    The query encoder is opened lazily, on the first query that needs encoding: an ONNX export of
    the index's model when one matches (INDEX/onnx/, the model folder's onnx/, the export cache),
    which needs no torch, else the torch model loaded from the identity in the manifest (`backend=`
    "auto", "onnx" or "torch"); pass `model=` to reuse one already loaded. A model whose weights
    differ from the index's is refused: its vectors would not be comparable. A query image that
    would decode to more than `max_pixels` pixels is refused before decoding (None: no limit).

    An index built from a model with a querybank (`retriever.querybank`) ranks the hits of
    text→image and image→text queries by cosine plus each row's bias, so hubs rank lower; hits
    still carry their cosine as `score`. `querybank=False` ranks by cosine alone.
    """

    def __init__(
        self,
        index_dir: str | Path,
        model: LoadedModel | None = None,
        *,
        device: str | None = None,
        use_gpu: bool | None = None,
        backend: str = "auto",
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        querybank: bool = True,
    ):
        configure_faiss()
        self.index_dir = Path(index_dir).expanduser()
        self.manifest: IndexManifest = read_index_manifest(self.index_dir)
        self.identity = ModelIdentity.from_dict(self.manifest.model)
        if model is not None:
            model.identity.check_same(self.identity, f"Index {self.index_dir}")
        self._model = model
        self._device = device
        self._use_gpu = use_gpu
        self._backend = backend
        self.max_pixels = max_pixels
        self.querybank = querybank
        self._query_encoder: QueryEncoder | None = None
        self._open: dict[str, OpenIndex] = {}
        self._masks: dict[tuple[str, str], RowFilter] = {}

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the faiss indexes, re-rank stores and rows files (the model stays with its owner)."""
        for oi in self._open.values():
            oi.close()
        self._open.clear()
        self._masks.clear()

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.indexes)

    # --- The query encoder: the one place it comes from -------------------------------------
    @property
    def model(self) -> LoadedModel:
        """The encoder for queries: the one passed in, else the index's model loaded on first use."""
        if self._model is None:
            from retriever.models.load import load_model

            try:
                encoder = load_model(self.identity.name, self.identity.pretrained, device=self._device)
            except UserError as e:
                raise UserError(
                    f"Could not load the index's model {self.identity.label()} ({e}); pass it with --model."
                ) from e
            encoder.identity.check_same(self.identity, f"Index {self.index_dir}")
            self._model = encoder
        return self._model

    @property
    def query_encoder(self) -> QueryEncoder:
        """What encodes queries: the index's ONNX export when a usable one exists (no torch import),
        else the torch model; the one place a Retriever obtains its query encoder (retriever.onnx.choose).
        A model passed in is used as is unless backend="onnx"."""
        if self._query_encoder is None:
            from retriever.onnx.choose import QueryEncoder, open_query_encoder

            if self._model is not None and self._backend != "onnx":
                self._query_encoder = QueryEncoder(None, lambda: self.model)
            else:
                self._query_encoder = open_query_encoder(
                    self.index_dir, self.identity, lambda: self.model, self._backend
                )
        return self._query_encoder

    @query_encoder.setter
    def query_encoder(self, encoder) -> None:
        """Use an encoder already opened for the same model (a server shares one between indexes)."""
        self._query_encoder = encoder

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        return self.query_encoder.encode_texts(list(texts), batch_size)

    def encode_images(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Query images as unit vectors; one over `max_pixels` is refused (ValueError) before decoding."""
        return self.query_encoder.encode_images(list(images), max_pixels=self.max_pixels)

    # --- Searching ------------------------------------------------------------------------------
    def search(
        self,
        query: Query | str | None = None,
        *,
        text: str | None = None,
        image: ImageInput | None = None,
        k: int = 10,
        modality: str = "image",
        where: str | None = None,
        min_score: float | None = None,
        dedup: float | None = None,
        keep_query: bool = False,
    ) -> Hits:
        """Top-k rows of the `modality` index ("image" or "text") for one query.

        query: a `Query` (its own options apply), or a term written as on the command line
        ("a dog", "2:snow", "id:7", "image:q.jpg"); text / image: a literal text / an image (path,
        bytes or PIL image); where: SQL condition over the rows' columns; min_score: drop hits below
        this cosine; dedup: fold hits within this cosine of a better hit; keep_query: keep the
        query's own images/items in the results (left out by default).
        """
        if isinstance(query, Query):
            if text is not None or image is not None:
                raise UserError("Give either a Query or text=/image=, not both.")
            q = query
        else:
            if query is not None and text is not None:
                raise UserError("Give the text once: as the query or as text=.")
            if query is None and text is None and image is None:
                raise UserError("Give a query: a text, an image or id:N.")
            terms = [Term.parse(query, "text")] if query is not None else []  # "2:snow", "id:7" are terms
            terms += [Term("text", text)] if text is not None else []  # text= is always literal text
            terms += [Term("image", image)] if image is not None else []
            q = Query(tuple(terms), modality, k, where, min_score, dedup, keep_query)
        return self.search_batch([q])[0]

    def search_batch(
        self,
        queries: Sequence[Query | str | Mapping],
        *,
        batch_size: int = 256,
        defaults: Mapping[str, Any] | None = None,
        progress: BatchProgress | None = None,
    ) -> list[Hits]:
        """Many queries: texts encoded in batches, queries with the same options searched together.

        queries: `Query` values, plain texts, or JSONL-style dicts (see `Query.from_dict`);
        defaults: options for texts and dicts that do not set them (k, modality, where, …).
        """
        qs = []
        for i, q in enumerate(queries):
            try:
                qs.append(_as_query(q, defaults))
            except UserError as e:
                raise QueryError(i, e) from None
        out: list[Hits | None] = [None] * len(qs)
        done = 0
        for lo in range(0, len(qs), batch_size):
            chunk = qs[lo : lo + batch_size]
            vecs, own_rows, cross = self._query_vectors(chunk, first=lo)
            groups: dict[tuple, list[int]] = {}
            for i, q in enumerate(chunk):
                groups.setdefault((q.modality, q.k, q.where, q.min_score, q.dedup), []).append(i)
            for (modality, k, where, min_score, dedup), idx in groups.items():
                own = [own_rows[i] for i in idx]
                hits = self._search_vectors(vecs[idx], modality, k, where, min_score, dedup, own, cross[idx])
                for i, h in zip(idx, hits):
                    h.query = chunk[i]
                    out[lo + i] = h
            done += len(chunk)
            if progress:
                progress(done, len(qs))
        return out  # type: ignore[return-value]

    def search_vectors(
        self,
        queries: np.ndarray,
        k: int = 10,
        modality: str = "image",
        *,
        where: str | None = None,
        min_score: float | None = None,
        dedup: float | None = None,
        query_modality: str | None = None,
    ) -> list[Hits]:
        """Top-k results for each row of `queries` (unit vectors from this index's model).

        query_modality: "text" or "image" when the vectors are queries of that kind; a search of
        the other modality then uses the index's querybank. None: rank by cosine alone."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        check_options(modality, k, where, min_score, dedup)
        cross = np.full(len(q), float(query_modality is not None and query_modality != modality), np.float32)
        return self._search_vectors(q, modality, k, where, min_score, dedup, [np.zeros(0, np.int64)] * len(q), cross)

    def search_raw(self, queries: np.ndarray, k: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """faiss's (scores, rows) for a batch of queries; rows are -1 past the index's end."""
        if k < 1:
            raise UserError("k must be at least 1.")
        oi = self._opened(modality)
        return oi.search(self._check_vectors(queries, oi), k)

    def lookup(self, modality: str, rows: np.ndarray, scores: np.ndarray | None = None) -> list[SearchResult]:
        """Metadata for the given faiss rows only: a `take` on the memory-mapped rows file."""
        rows = np.asarray(rows)
        return self.lookup_many(modality, rows[None, :], None if scores is None else np.asarray(scores)[None, :])[0]

    def lookup_many(
        self, modality: str, rows: np.ndarray, scores: np.ndarray | None = None
    ) -> list[list[SearchResult]]:
        """lookup() for a (queries, k) array of rows in one `take`: per-query takes cost more than
        the search itself for fast indexes."""
        rows = np.asarray(rows)
        keep = rows >= 0
        table = self._opened(modality).rows.take(rows[keep])
        sc = (np.asarray(scores)[keep] if scores is not None else np.full(int(keep.sum()), np.nan, np.float32)).tolist()
        base = [table.column(c).to_pylist() for c in ("id", "path", "caption")]
        extra = [c for c in table.column_names if c not in BASE_COLUMNS and c not in HIDDEN_COLUMNS]
        if extra:
            meta = table.select(extra).to_pylist()
            hits = list(map(SearchResult, _ranks(keep), base[0], sc, base[1], base[2], meta))
        else:
            hits = list(map(SearchResult, _ranks(keep), base[0], sc, base[1], base[2]))
        ends = np.cumsum(keep.sum(axis=1)).tolist()
        return [hits[lo:hi] for lo, hi in zip([0, *ends], ends)]

    def columns(self, modality: str = "image") -> dict[str, str]:
        """Column name → Arrow type of the rows file (what --where can use)."""
        return {f.name: str(f.type) for f in self._opened(modality).rows.schema if f.name not in HIDDEN_COLUMNS}

    def filter_mask(self, modality: str, where: str) -> np.ndarray:
        """Boolean mask of the `modality` index's rows matching `where`."""
        return self.row_filter(modality, where).mask

    def row_filter(self, modality: str, where: str) -> RowFilter:
        """The rows matching `where` (cached with their gathered vectors: batches repeat filters)."""
        key = (modality, where)
        if key not in self._masks:
            if len(self._masks) >= MASK_CACHE:
                self._masks.pop(next(iter(self._masks)))
            self._masks[key] = RowFilter(where_mask(self._opened(modality).rows, where))
        return self._masks[key]

    # --- Internals --------------------------------------------------------------------------------
    def _query_vectors(
        self, queries: Sequence[Query], first: int = 0
    ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """One unit vector per query, the rows of each query's own images/items (to leave out), and
        each query's cross-modal weight: the signed weight of its terms of the other modality than
        the searched one over the norm of the weighted sum (1 for a plain text→image query, 0 for
        image→image), never below 0. It scales the querybank bias, which is linear in the terms."""
        texts = sorted({t.value for q in queries for t in q.terms if t.kind == "text"})
        text_vec = dict(zip(texts, self.encode_texts(texts))) if texts else {}
        for qi, q in enumerate(queries):
            for t in q.terms:
                if t.kind == "image" and isinstance(t.value, (str, Path)) and not Path(t.value).expanduser().is_file():
                    err = UserError(f"The query image {t.value} does not exist (text terms go in --and / --not).")
                    raise QueryError(first + qi, err)
        images = [(qi, t.value) for qi, q in enumerate(queries) for t in q.terms if t.kind == "image"]
        image_vec = self._encode_image_terms(images, first)
        out = np.zeros((len(queries), self._dim()), np.float32)
        cross = np.zeros(len(queries), np.float32)
        own: list[np.ndarray] = []
        img_i = 0
        for qi, q in enumerate(queries):
            oi = self._opened(q.modality)
            own_rows = []
            for t in q.terms:
                if t.kind == "text":
                    v, of = text_vec[t.value], "text"
                elif t.kind == "image":
                    v, of = image_vec[img_i], "image"
                    img_i += 1
                    if q.modality == "image" and isinstance(t.value, (str, Path)):
                        own_rows.append(oi.rows.rows_where("path", [str(Path(t.value).expanduser().resolve())]))
                else:
                    try:
                        v, rows, of = self._item_vector(int(t.value), q.modality)
                    except UserError as e:
                        raise QueryError(first + qi, e) from None
                    own_rows.append(rows)
                w = -t.weight if t.negative else t.weight
                out[qi] += w * v
                cross[qi] += w if of != q.modality else 0.0
            norm = float(np.linalg.norm(out[qi]))
            if not np.isfinite(norm) or norm < 1e-6:
                err = UserError("The query's terms cancel out (their weighted sum is zero); change a weight or a term.")
                raise QueryError(first + qi, err)
            out[qi] /= norm
            cross[qi] = max(cross[qi] / norm, 0.0)
            own.append(np.zeros(0, np.int64) if q.keep_query or not own_rows else np.unique(np.concatenate(own_rows)))
        return out, own, cross

    def _encode_image_terms(self, images: list[tuple[int, Any]], first: int) -> np.ndarray:
        """Vectors of (query position, image) pairs; an unreadable image is named with its query."""
        if not images:
            return np.zeros((0, self._dim()), np.float32)
        values = [Path(i).expanduser() if isinstance(i, str) else i for _, i in images]
        from PIL import Image

        unreadable = (OSError, ValueError, Image.DecompressionBombError)
        try:
            return self.encode_images(values)
        except unreadable:
            for (qi, raw), value in zip(images, values):  # find the culprit
                try:
                    self.encode_images([value])
                except unreadable as e:
                    msg = f"The query image {raw} is not a readable image ({e})."
                    raise QueryError(first + qi, UserError(msg)) from None
            raise

    def _item_vector(self, item_id: int, modality: str) -> tuple[np.ndarray, np.ndarray, str]:
        """The stored vector of indexed item `item_id` (from the searched modality, else the image
        index), its rows in the searched modality, and the modality the vector came from."""
        searched = self._opened(modality)
        rows = searched.rows.rows_where("id", [item_id])
        if len(rows):
            return searched.vectors(rows[:1])[0], rows, modality
        if modality != "image" and "image" in self.manifest.indexes:
            img = self._opened("image")
            img_rows = img.rows.rows_where("id", [item_id])
            if len(img_rows):
                return img.vectors(img_rows[:1])[0], rows, "image"
        raise UserError(f"No indexed item has id {item_id} (query term id:{item_id}).")

    def _search_vectors(
        self,
        q: np.ndarray,
        modality: str,
        k: int,
        where: str | None,
        min_score: float | None,
        dedup: float | None,
        own_rows: list[np.ndarray],
        cross: np.ndarray,
    ) -> list[Hits]:
        oi = self._opened(modality)
        q = self._check_vectors(q, oi)
        flt = self.row_filter(modality, where) if where else None
        matching = flt.matching if flt is not None else None
        results: list[tuple[np.ndarray, np.ndarray, np.ndarray, QueryReport] | None] = [None] * len(q)
        todo = np.arange(len(q))
        extra = max((len(r) for r in own_rows), default=0)
        fetch = (3 * k if dedup is not None else k) + extra
        tau = oi.entry.extra.get("querybank", {}).get("tau") if self.querybank and oi.has_querybank else None
        biased = cross > 0 if tau is not None else np.zeros(len(q), bool)  # queries ranked with the bias
        # How far a row not yet fetched could climb: the largest bias among the rows it may be.
        lift = cross * oi.querybank_bias_max(flt) if biased.any() else np.zeros(len(q), np.float32)
        if biased.any():
            fetch = max(fetch, QUERYBANK_MIN_FETCH)
        while len(todo):
            cand = oi.candidates(q[todo], fetch, flt)
            exhausted = cand.exhausted or fetch >= oi.ntotal
            finished = []
            for j, qi in enumerate(todo.tolist()):
                report = QueryReport(cand.strategy, matching)
                s, r = cand.scores[j], cand.rows[j]
                ok = r >= 0
                # Every row not fetched has a cosine at most the last fetched one's (exact indexes).
                tail = float(s[ok][-1]) if ok.any() else float("-inf")
                if len(own_rows[qi]):
                    own = np.isin(r, own_rows[qi])
                    report.excluded_query_items = int((own & ok).sum())
                    ok &= ~own
                s, r = s[ok], r[ok]
                rank_by = s
                if biased[qi]:
                    rank_by = s + cross[qi] * oi.querybank_bias(r)
                    order = np.argsort(-rank_by, kind="stable")
                    s, r, rank_by = s[order], r[order], rank_by[order]
                    report.extra["querybank_tau"] = tau
                    report.extra["querybank_candidates"] = int(len(cand.rows[j]))
                absorbed = np.zeros(len(r), np.int64)
                if dedup is not None and len(r):
                    keep, absorbed = fold_near_duplicates(oi.vectors(r), dedup)
                    s, r, absorbed, rank_by = s[keep], r[keep], absorbed[keep], rank_by[keep]
                below_floor_tail = min_score is not None and tail < min_score
                # With the bias, a row not fetched could still outrank the k-th hit: it has a cosine
                # of at most `tail` and a bias of at most the largest. Past the cap, accept.
                settled = len(r) >= k and (
                    not biased[qi] or rank_by[k - 1] >= tail + lift[qi] or fetch >= QUERYBANK_MAX_FETCH
                )
                if settled or exhausted or below_floor_tail:
                    s, r, absorbed = s[:k], r[:k], absorbed[:k]
                    if min_score is not None:
                        above = s >= min_score
                        report.below_min_score = int((~above).sum())
                        s, r, absorbed = s[above], r[above], absorbed[above]
                    report.folded_duplicates = int(absorbed.sum())
                    results[qi] = (s, r, absorbed, report)
                    finished.append(j)
            todo = np.delete(todo, finished)
            fetch = min(oi.ntotal, fetch * (4 if biased.any() else 2))
        return self._to_hits(modality, results)  # type: ignore[arg-type]

    def _to_hits(self, modality: str, results: list[tuple[np.ndarray, np.ndarray, np.ndarray, QueryReport]]):
        """Hits for every query from one `take` on the rows file (per-query takes cost more than
        the search for fast indexes)."""
        width = max((len(r) for _, r, _, _ in results), default=0)
        rows = np.full((len(results), width), -1, np.int64)
        scores = np.zeros((len(results), width), np.float32)
        for i, (s, r, _, _) in enumerate(results):
            rows[i, : len(r)] = r
            scores[i, : len(s)] = s
        out = []
        for hits, (_, _, absorbed, report) in zip(self.lookup_many(modality, rows, scores), results):
            for h, a in zip(hits, absorbed.tolist()):
                h.absorbed = a
            out.append(Hits(hits, report))
        return out

    def _check_vectors(self, queries: np.ndarray, oi: OpenIndex) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != oi.d:
            raise UserError(f"Query vectors must have shape (n, {oi.d}).")
        return q

    def _dim(self) -> int:
        return int(next(iter(self.manifest.indexes.values())).dim)

    def _entry(self, modality: str) -> ModalityIndex:
        if modality not in ("image", "text"):
            raise UserError(f"Unknown modality {modality!r}; choose image or text.")
        entry = self.manifest.indexes.get(modality)
        if entry is None:
            raise UserError(f"Index {self.index_dir} has no {modality} index (its shards had no captions).")
        return entry

    def _index(self, modality: str) -> faiss.Index:
        """The faiss index object this Retriever searches (parameters set, on a GPU if placed)."""
        return self._opened(modality).index

    def _opened(self, modality: str) -> OpenIndex:
        if modality not in self._open:
            self._open[modality] = OpenIndex(self.index_dir, self._entry(modality), self._use_gpu)
        return self._open[modality]


def fold_near_duplicates(vectors: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Walk hits best first; a hit within cosine `threshold` of an already kept hit is folded into
    the most similar kept one. Returns (kept positions, absorbed count per position)."""
    n = len(vectors)
    sims = vectors @ vectors.T
    kept: list[int] = []
    absorbed = np.zeros(n, np.int64)
    for i in range(n):
        if kept:
            best = int(np.argmax(sims[i, kept]))
            if sims[i, kept[best]] >= threshold:
                absorbed[kept[best]] += 1
                continue
        kept.append(i)
    return np.asarray(kept, np.int64), absorbed


def _as_query(q: Query | str | Mapping, defaults: Mapping[str, Any] | None) -> Query:
    if isinstance(q, Query):
        return q
    if isinstance(q, str):
        return Query((Term.parse(q, "text"),), **(defaults or {}))
    return Query.from_dict(q, defaults)


def _ranks(keep: np.ndarray) -> list[int]:
    """1-based rank of each kept hit, row by row (hits of a row are kept in rank order)."""
    return (np.cumsum(keep, axis=1)[keep]).tolist()


def search_many(retriever: Retriever, texts: Sequence[str], k: int = 10, modality: str = "image"):
    """Batch text search: one encoder pass, one faiss call."""
    return retriever.search_vectors(retriever.encode_texts(list(texts)), k, modality, query_modality="text")
