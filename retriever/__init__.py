"""retriever: contrastive cross-modal retrieval (fine-tune, embed to Parquet, index with FAISS, search)."""

__version__ = "0.1.0"
