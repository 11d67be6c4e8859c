"""How an index is to be built: `BuildConfig` (no faiss, no numpy, so `retriever index` takes its
option defaults from here; `retriever.indexes` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass

from retriever.errors import ConfigError
from retriever.indexes.choose import FLAT_MAX


@dataclass
class BuildConfig:
    """How `build_index` builds (each field's comment says what it does).

    Attributes:
        index_type: "auto" chooses by size and memory; or flat, hnsw, ivf, ivfpq, opq.
        flat_max: "auto" stays exact (flat) up to this many vectors.
        use_gpu: build on the GPU (None: when faiss has GPU support and sees one).
        batch_size: vectors added per faiss call; seed: seed of training samples.
        max_memory: bytes the index may use (None: no limit); on_disk: force on-disk inverted lists.
        target_recall: tune search parameters to reach this recall@k (None: no tuning); k: that k.
        tune_queries: queries drawn from the data for tuning.
        querybank: when the shards' model folder carries a querybank (`retriever train` writes
            one), store each row's bias so that cross-modal searches rank hubs lower.
    """

    index_type: str = "auto"  # auto | flat | hnsw | ivf | ivfpq | opq
    flat_max: int = FLAT_MAX
    use_gpu: bool | None = None  # None: when faiss has GPU support and sees a GPU
    batch_size: int = 16_384
    seed: int = 0
    max_memory: int | None = None  # bytes for the index (see select.py); None: no limit
    on_disk: bool = False  # force on-disk inverted lists (IVF kinds); the budget may also ask for them
    target_recall: float | None = None  # tune search parameters to reach this recall@k
    k: int = 10
    tune_queries: int = 1000  # queries drawn from the data for tuning
    querybank: bool = True  # use the model's querybank (retriever.querybank) when it has one

    def validate(self) -> None:
        """Raise `ConfigError` (naming the parameter) for settings that cannot work."""
        if self.target_recall is not None and not 0 < self.target_recall <= 1:
            raise ConfigError("target_recall must be between 0 and 1, e.g. 0.95.", "target_recall")
        if self.k < 1:
            raise ConfigError("k must be at least 1.", "k")
        if self.batch_size < 1 or self.tune_queries < 1:
            raise ConfigError("batch_size and tune_queries must be at least 1.", "batch_size", "tune_queries")
