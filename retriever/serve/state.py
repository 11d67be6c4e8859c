"""The indexes a server holds: each opened once, swapped whole on reload, models shared by identity.

A request takes the current `ServedIndex` object at its start and uses only it, so a reload that
swaps in a new one never changes an index under a query in flight: the old object (and its
memory-mapped files, which survive the folder being replaced) lives until its last query ends.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retriever.errors import UserError
from retriever.indexes.manifest import MANIFEST
from retriever.search import Retriever, SearchResult

log = logging.getLogger("retriever.serve")


def manifest_signature(index_dir: Path) -> tuple:
    """What changes when `retriever index` (or `--add`) rewrites the folder: inode, size, mtime."""
    try:
        st = os.stat(index_dir / MANIFEST)
    except OSError:
        return ()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass
class ServedIndex:
    """One opened index folder: its Retriever, an id -> row map, and where its images may live."""

    name: str
    path: Path
    retriever: Retriever
    signature: tuple
    generation: int = 1
    _ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted global ids
    _rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # row of each sorted id
    _item_modality: str = "image"
    roots: tuple[Path, ...] = ()  # resolved folders that recorded paths must stay inside
    batchers: dict = field(default_factory=dict)  # modality -> Batcher of text queries (serve/query.py)

    @property
    def count(self) -> int:
        return int(len(self._ids))

    def describe(self) -> dict:
        m = self.retriever.manifest
        return {
            "name": self.name,
            "count": self.count,
            "modalities": {
                mod: {
                    "count": e.count,
                    "dim": e.dim,
                    "factory": e.factory,
                    "search_params": e.search_params,
                    "rerank": e.rerank or None,
                    "columns": self.retriever.columns(mod),  # what a where filter can name
                }
                for mod, e in m.indexes.items()
            },
            "model": m.model,
            "created": m.created,
            "generation": self.generation,
        }

    def item(self, item_id: int) -> SearchResult | None:
        """The indexed item with this global id, or None."""
        row = self.row_of(item_id)
        if row is None:
            return None
        hits = self.retriever.lookup(self._item_modality, np.array([row], np.int64))
        return hits[0] if hits else None

    def items(self, item_ids: list[int]) -> list[SearchResult | None]:
        return [self.item(i) for i in item_ids]

    def row_of(self, item_id: int) -> int | None:
        pos = int(np.searchsorted(self._ids, item_id))
        if pos < len(self._ids) and int(self._ids[pos]) == item_id:
            return int(self._rows[pos])
        return None

    def file_of(self, item_id: int) -> Path | None:
        """The image file of an item, only if it resolves inside the collection (no symlinks out)."""
        hit = self.item(item_id)
        if hit is None or not hit.path:
            return None
        try:
            real = Path(hit.path).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_file() or not any(real.is_relative_to(root) for root in self.roots):
            return None
        return real

    def item_vector(self, item_id: int, modality: str) -> np.ndarray | None:
        """The stored vector of an item in `modality`'s index, if the index can give it back."""
        entry = self.retriever.manifest.indexes.get(modality)
        if entry is None:
            return None
        ids = self._modality_ids(modality)
        pos = int(np.searchsorted(ids[0], item_id))
        if pos >= len(ids[0]) or int(ids[0][pos]) != item_id:
            return None
        row = int(ids[1][pos])
        index = self.retriever._index(modality)
        try:
            return np.asarray(index.reconstruct(row), np.float32)[None, :]
        except RuntimeError:  # IVF without a direct map, on-disk lists: the caller encodes the file
            return None

    def _modality_ids(self, modality: str) -> tuple[np.ndarray, np.ndarray]:
        if modality == self._item_modality:
            return self._ids, self._rows
        cached = self.__dict__.setdefault("_other_ids", {})
        if modality not in cached:
            cached[modality] = _id_map(self.retriever, modality)
        return cached[modality]


def _id_map(retriever: Retriever, modality: str) -> tuple[np.ndarray, np.ndarray]:
    batches = retriever._opened(modality).rows.batches
    ids = np.concatenate([b.column("id").to_numpy() for b in batches]) if batches else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order].astype(np.int64), order.astype(np.int64)


def _collection_roots(retriever: Retriever, modality: str) -> tuple[Path, ...]:
    """The deepest folder holding every recorded image path (resolved): files outside it are never served."""
    batches = retriever._opened(modality).rows.batches
    parents = {os.path.dirname(p) for b in batches for p in b.column("path").to_pylist() if p}
    if not parents:
        return ()
    try:
        common = os.path.commonpath(sorted(parents))
    except ValueError:  # mixed drives / relative and absolute: fall back to each parent folder
        return tuple(sorted({Path(p).resolve() for p in parents}))
    return (Path(common).resolve(),)


def open_index(name: str, path: Path, models: ModelCache, generation: int = 1) -> ServedIndex:
    """Open an index folder completely (faiss files, rows, model) so the first query is fast."""
    signature = manifest_signature(path)
    retriever = Retriever(path, backend=models.backend)
    shared = models.get(path)
    if shared is not None:
        retriever.query_encoder = shared
    for modality in retriever.modalities:
        retriever._opened(modality)  # faiss index, rows file and re-rank store
    item_modality = "image" if "image" in retriever.modalities else retriever.modalities[0]
    ids, rows = _id_map(retriever, item_modality)
    served = ServedIndex(name, path, retriever, signature, generation, ids, rows, item_modality)
    served.roots = _collection_roots(retriever, item_modality)
    if shared is None:
        models.put(retriever)
    return served


class ModelCache:
    """One query encoder per model identity, shared by every index built with it: the index's ONNX
    export when one is usable (no torch in the server), else the torch model (retriever.onnx.choose).
    `preloaded` is a torch LoadedModel given on the command line; it answers for its identity.
    `backend`: auto, onnx or torch (retriever.onnx.choose.open_query_encoder)."""

    def __init__(self, preloaded=None, backend: str = "auto"):
        self.backend = backend
        self._models: dict[str, object] = {}
        self._lock = threading.Lock()
        if preloaded is not None:
            from retriever.onnx.choose import QueryEncoder

            self._models[_key(preloaded.identity.to_dict())] = QueryEncoder(None, lambda: preloaded)

    def get(self, index_dir: Path):
        from retriever.indexes.manifest import read_index_manifest

        return self._models.get(_key(read_index_manifest(index_dir).model))

    def put(self, retriever: Retriever) -> None:
        with self._lock:
            encoder = retriever.query_encoder.prepare()  # loads it once, here, at start-up or reload
            self._models.setdefault(_key(retriever.identity.to_dict()), encoder)

    def all(self) -> list:
        return list(self._models.values())


def _key(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True, default=str)


class Registry:
    """name -> ServedIndex, with reloads that swap atomically and keep the old index on failure."""

    def __init__(self, models: ModelCache):
        self.models = models
        self._indexes: dict[str, ServedIndex] = {}
        self._reload_lock = threading.Lock()
        self.reload_errors: dict[str, str] = {}

    def add(self, name: str, path: Path) -> ServedIndex:
        if name in self._indexes:
            raise UserError(f"Two indexes are named {name!r}; name them with NAME=PATH.")
        served = open_index(name, path, self.models)
        self._indexes[name] = served
        return served

    def names(self) -> list[str]:
        return list(self._indexes)

    def get(self, name: str | None) -> ServedIndex:
        if name is None or name == "":
            return next(iter(self._indexes.values()))
        try:
            return self._indexes[name]
        except KeyError:
            raise IndexNotFound(name, self.names()) from None

    def all(self) -> list[ServedIndex]:
        return list(self._indexes.values())

    def reload(self, name: str, force: bool = True) -> tuple[bool, str]:
        """Reopen `name` from its folder; (changed, message). A broken folder keeps the old one serving."""
        old = self.get(name)
        with self._reload_lock:
            signature = manifest_signature(old.path)
            if not force and signature == old.signature:
                return False, "unchanged"
            try:
                new = open_index(name, old.path, self.models, old.generation + 1)
            except Exception as e:  # noqa: BLE001 (any failure to open must leave the old index serving)
                msg = f"Reloading index {name!r} from {old.path} failed, still serving the previous one: {e}"
                log.error(msg)
                self.reload_errors[name] = str(e)
                old.signature = signature  # do not retry the same broken folder every poll
                return False, msg
            self._indexes[name] = new
            self.reload_errors.pop(name, None)
            log.warning(
                "Reloaded index %r from %s: %d items (generation %d).", name, old.path, new.count, new.generation
            )
            return True, f"reloaded: {new.count} items"


class IndexNotFound(UserError):
    def __init__(self, name: str, names: list[str]):
        super().__init__(f"No index named {name!r}; this server has {', '.join(names) or 'none'}.")
        self.name = name
