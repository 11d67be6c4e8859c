"""retriever: contrastive cross-modal retrieval (fine-tune, embed to Parquet, index with FAISS, search).

from retriever import load_model, read_source, embed_items, build_index, Retriever
from retriever import train, TrainConfig, evaluate, add_to_index
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from retriever.lazy import lazy_attributes

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load on first use below
    from retriever.data.images import load_image
    from retriever.data.sources import SourceItem, read_source
    from retriever.dedup import find_duplicates
    from retriever.embed import EmbedResult, embed_items
    from retriever.embed_config import EmbedConfig
    from retriever.errors import ConfigError, UserError
    from retriever.evaluation import EvalResult, evaluate
    from retriever.identity import ModelIdentity
    from retriever.indexes import build_index
    from retriever.indexes.add import add_to_index
    from retriever.indexes.config import BuildConfig
    from retriever.models.encode import encode_images, encode_texts
    from retriever.models.load import LoadedModel, load_model
    from retriever.query import Query, Term
    from retriever.search import Hits, Retriever, SearchResult
    from retriever.shards import ShardSet
    from retriever.training.config import OptimConfig, TrainConfig
    from retriever.training.loop import TrainResult, train

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
    "EmbedConfig": "embed_config",
    "EmbedResult": "embed",
    "ShardSet": "shards",
    "build_index": "indexes",
    "BuildConfig": "indexes.config",
    "add_to_index": "indexes.add",
    "Retriever": "search",
    "SearchResult": "search",
    "Hits": "search",
    "Query": "query",
    "Term": "query",
    "find_duplicates": "dedup",
    "UserError": "errors",
    "ConfigError": "errors",
    "evaluate": "evaluation",
    "EvalResult": "evaluation",
    "train": "training.loop",
    "TrainConfig": "training.config",
    "OptimConfig": "training.config",
    "TrainResult": "training.loop",
}

__all__ = [
    "BuildConfig",
    "ConfigError",
    "EmbedConfig",
    "EmbedResult",
    "EvalResult",
    "Hits",
    "LoadedModel",
    "ModelIdentity",
    "OptimConfig",
    "Query",
    "Retriever",
    "SearchResult",
    "ShardSet",
    "SourceItem",
    "Term",
    "TrainConfig",
    "TrainResult",
    "UserError",
    "add_to_index",
    "build_index",
    "embed_items",
    "encode_images",
    "encode_texts",
    "evaluate",
    "find_duplicates",
    "load_image",
    "load_model",
    "read_source",
    "train",
    "__version__",
]


__getattr__ = lazy_attributes(__name__, _EXPORTS)
