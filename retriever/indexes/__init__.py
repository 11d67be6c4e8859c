"""FAISS indexes over retriever shards: choice, building, storage, GPU placement."""

from __future__ import annotations

from typing import TYPE_CHECKING

from retriever.lazy import lazy_attributes

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use below
    from retriever.indexes.build import build_index, new_index
    from retriever.indexes.choose import IndexSpec, choose_index
    from retriever.indexes.config import BuildConfig
    from retriever.indexes.gpu import gpu_count
    from retriever.indexes.manifest import IndexManifest, ModalityIndex, read_index_manifest
    from retriever.indexes.open import set_search_params

# Loaded on first use, so that `retriever.indexes.config` (and the CLI reading it) imports no faiss.
_EXPORTS = {
    "BuildConfig": "config",
    "IndexManifest": "manifest",
    "IndexSpec": "choose",
    "ModalityIndex": "manifest",
    "build_index": "build",
    "choose_index": "choose",
    "gpu_count": "gpu",
    "new_index": "build",
    "read_index_manifest": "manifest",
    "set_search_params": "open",
}

__all__ = [
    "BuildConfig",
    "IndexManifest",
    "IndexSpec",
    "ModalityIndex",
    "build_index",
    "choose_index",
    "gpu_count",
    "new_index",
    "read_index_manifest",
    "set_search_params",
]


__getattr__ = lazy_attributes(__name__, _EXPORTS)
