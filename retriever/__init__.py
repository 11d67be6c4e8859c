"""retriever: contrastive cross-modal retrieval (fine-tune, embed to Parquet, index with FAISS, search).

from retriever import load_model, read_source, embed_items, build_index, Retriever
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Imported on first use so that `retriever --help` and light scripts do not pay for torch and faiss.
_EXPORTS = {
    "load_model": "models.load",
    "LoadedModel": "models.load",
    "ModelIdentity": "identity",
    "encode_images": "models.encode",
    "encode_texts": "models.encode",
    "load_image": "data.images",
    "read_source": "data.sources",
    "SourceItem": "data.sources",
    "embed_items": "embed",
    "EmbedConfig": "embed",
    "EmbedResult": "embed",
    "ShardSet": "shards",
    "build_index": "indexes",
    "BuildConfig": "indexes",
    "Retriever": "search",
    "SearchResult": "search",
    "UserError": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'retriever' has no attribute {name!r}")
