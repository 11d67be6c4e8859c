"""Query an index by text or image: `Retriever(index_dir).search(text="a red apple")`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import pyarrow as pa

from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.indexes import gpu
from retriever.indexes.build import set_search_params
from retriever.indexes.files import open_rows, read_index_file
from retriever.indexes.manifest import IndexManifest, ModalityIndex, read_index_manifest
from retriever.indexes.rerank import VectorStore, search_index
from retriever.indexes.settings import configure_faiss

if TYPE_CHECKING:  # torch is imported only when a query has to be encoded
    from retriever.data.images import ImageInput
    from retriever.models.load import LoadedModel


@dataclass(slots=True)
class SearchResult:
    """One hit: its rank (1 = best), row id, cosine score, image path and caption."""

    rank: int
    id: int
    score: float  # cosine similarity (inner product of unit vectors)
    path: str
    caption: str | None

    def to_dict(self) -> dict:
        return asdict(self)


class Retriever:
    """An opened index folder plus the model its vectors came from.

    The query encoder is opened lazily, on the first query that needs encoding: an ONNX export of
    the index's model when one matches (INDEX/onnx/, the model folder's onnx/, the export cache),
    which needs no torch, else the torch model loaded from the identity in the manifest (`backend=`
    "auto", "onnx" or "torch"); pass `model=` to reuse one already loaded. A model whose weights
    differ from the index's is refused: its vectors would not be comparable.
    """

    def __init__(
        self,
        index_dir: str | Path,
        model: LoadedModel | None = None,
        *,
        device: str | None = None,
        use_gpu: bool | None = None,
        backend: str = "auto",
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
        self._query_encoder = None
        self._indexes: dict[str, faiss.Index] = {}
        self._rows: dict[str, tuple[list[pa.RecordBatch], np.ndarray]] = {}
        self._stores: dict[str, VectorStore | None] = {}

    @property
    def modalities(self) -> list[str]:
        return list(self.manifest.indexes)

    @property
    def model(self) -> LoadedModel:
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
    def query_encoder(self):
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

    def search(
        self,
        text: str | None = None,
        image: ImageInput | None = None,
        k: int = 10,
        modality: str = "image",
    ) -> list[SearchResult]:
        """Top-k rows of the `modality` index ("image" or "text") for one text or image query."""
        if (text is None) == (image is None):
            raise UserError("Give exactly one query: a text or an image.")
        if image is not None:
            from PIL import Image

            try:
                q = self.query_encoder.encode_images([image])
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise UserError(f"Could not read the query image: {e}") from None
        else:
            assert text is not None  # exactly one of text/image, checked above
            if not text.strip():
                raise UserError("The text query is empty; give some words to search for.")
            q = self.query_encoder.encode_texts([text])
        return self.search_vectors(q, k, modality)[0]

    def search_vectors(self, queries: np.ndarray, k: int = 10, modality: str = "image") -> list[list[SearchResult]]:
        """Top-k results for each row of `queries` (unit vectors from this index's model)."""
        scores, rows = self.search_raw(queries, k, modality)
        return self.lookup_many(modality, rows, scores)

    def search_raw(self, queries: np.ndarray, k: int, modality: str) -> tuple[np.ndarray, np.ndarray]:
        """faiss's (scores, rows) for a batch of queries; rows are -1 past the index's end."""
        if k < 1:
            raise UserError("k must be at least 1.")
        index = self._index(modality)
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != index.d:
            raise UserError(f"Query vectors must have shape (n, {index.d}).")
        entry = self._entry(modality)
        return search_index(index, q, k, entry.search_params, self._store(modality), max_k=gpu.max_k(index))

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
        ids, paths, caps = self._take_rows(modality, rows[keep])
        sc = (np.asarray(scores)[keep] if scores is not None else np.full(int(keep.sum()), np.nan, np.float32)).tolist()
        hits = list(map(SearchResult, _ranks(keep), ids, sc, paths, caps))
        ends = np.cumsum(keep.sum(axis=1)).tolist()
        return [hits[lo:hi] for lo, hi in zip([0, *ends], ends)]

    def _entry(self, modality: str) -> ModalityIndex:
        if modality not in ("image", "text"):
            raise UserError(f"Unknown modality {modality!r}; choose image or text.")
        entry = self.manifest.indexes.get(modality)
        if entry is None:
            raise UserError(f"Index {self.index_dir} has no {modality} index (its shards had no captions).")
        return entry

    def _index(self, modality: str) -> faiss.Index:
        if modality not in self._indexes:
            entry = self._entry(modality)
            # On-disk inverted lists are memory-mapped from the .ivfdata file beside the index.
            index = read_index_file(self.index_dir, entry)
            set_search_params(index, entry.search_params)  # before moving: the GPU clone keeps them
            if self._use_gpu is not False and not entry.ivfdata_file:
                plan = gpu.gpu_plan(index, gpu.gpu_count(), gpu_free_bytes=gpu._gpu_free_bytes())
                if self._use_gpu and not plan.ok:
                    raise UserError(
                        f"use_gpu was asked for, but the {modality} index cannot go to a GPU: {plan.reason}."
                    )
                if plan.ok:
                    index = gpu.to_gpu(index, plan)
                    set_search_params(index, entry.search_params)
            self._indexes[modality] = index
        return self._indexes[modality]

    def _store(self, modality: str) -> VectorStore | None:
        """The on-disk exact vectors an index re-ranks from, if it has them."""
        if modality not in self._stores:
            entry = self._entry(modality)
            files = [self.index_dir / f for f in entry.vectors_files] if entry.rerank == "mmap" else []
            self._stores[modality] = VectorStore(files) if files else None
        return self._stores[modality]

    def _take_rows(self, modality: str, rows: np.ndarray) -> tuple[list, list, list]:
        """(ids, paths, captions) of faiss rows, reading only the record batches that hold them.

        Not Table.take: on a table of many record batches (one per 16k rows written) Arrow joins
        the chunks first, which made k = 10 cost 28 ms over 10M rows. Rows are grouped by batch,
        taken, and put back in the caller's order with one more take.
        """
        batches, starts = self._rows_batches(modality)
        rows = np.asarray(rows, np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        order = np.argsort(which, kind="stable")
        groups, first = np.unique(which[order], return_index=True)
        bounds = [*first.tolist(), len(order)]
        parts = [
            batches[b].take(_int64_array(rows[order[lo:hi]] - starts[b]))
            for b, lo, hi in zip(groups.tolist(), bounds, bounds[1:])
        ]
        if not parts:
            return [], [], []
        table = pa.Table.from_batches(parts).combine_chunks().take(_int64_array(np.argsort(order, kind="stable")))
        return table.column("id").to_pylist(), table.column("path").to_pylist(), table.column("caption").to_pylist()

    def _rows_batches(self, modality: str) -> tuple[list[pa.RecordBatch], np.ndarray]:
        """The rows file's record batches (memory-mapped) and the first row of each."""
        if modality not in self._rows:
            entry = self._entry(modality)
            reader = open_rows(self.index_dir / entry.rows_file, entry.count)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            starts = np.cumsum([0] + [b.num_rows for b in batches])[:-1]
            self._rows[modality] = (batches, starts)
        return self._rows[modality]


def _int64_array(a: np.ndarray) -> pa.Array:
    """A zero-copy Arrow view of int64 numbers. Not pa.array(numpy): that imports pandas (0.3-0.7 s of
    a cold query) to check whether its argument is a pandas object."""
    a = np.ascontiguousarray(a, np.int64)
    return pa.Array.from_buffers(pa.int64(), len(a), [None, pa.py_buffer(a)])


def _ranks(keep: np.ndarray) -> list[int]:
    """1-based rank of each kept hit, row by row (hits of a row are kept in rank order)."""
    return (np.cumsum(keep, axis=1)[keep]).tolist()


def search_many(retriever: Retriever, texts: Sequence[str], k: int = 10, modality: str = "image"):
    """Batch text search: one encoder pass, one faiss call."""
    return retriever.search_vectors(retriever.query_encoder.encode_texts(list(texts)), k, modality)
