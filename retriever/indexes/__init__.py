"""FAISS indexes over retriever shards: choice, building, storage, GPU placement."""

from retriever.indexes.build import BuildConfig, build_index, new_index
from retriever.indexes.choose import IndexSpec, choose_index
from retriever.indexes.gpu import gpu_count
from retriever.indexes.manifest import IndexManifest, ModalityIndex, read_index_manifest
from retriever.indexes.open import set_search_params

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
