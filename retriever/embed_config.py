"""What an embedding run is asked to do: `EmbedConfig` (stdlib only, so `retriever embed` takes its
option defaults from here without importing torch; `retriever.embed` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from retriever.data.limits import DEFAULT_MAX_PIXELS
from retriever.errors import ConfigError


def _default_workers() -> int:
    from retriever.data.loading import default_workers  # torch: only when a config is made

    return default_workers()


@dataclass
class EmbedConfig:
    """How `embed_items` writes shards.

    Args:
        shard_size: rows per Parquet shard (the unit of resuming).
        batch_size: images per encoder batch; text_batch_size: captions per text-encoder batch.
        num_workers: image-decoding worker processes (0: decode in the main process; default:
            `data.loading.default_workers()`).
        dtype: embedding storage, "float32" or "float16".
        overwrite: discard shards made with other arguments instead of refusing.
        max_pixels: images decoding to more pixels are skipped and reported (None: no limit).
        num_parts, part: the items' shards are split among `num_parts` independent parts (see
            `retriever.parts`); this run writes part `part`.
    """

    shard_size: int = 10_000
    batch_size: int = 32
    text_batch_size: int = 256
    num_workers: int = field(default_factory=_default_workers)
    dtype: str = "float32"
    overwrite: bool = False
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    num_parts: int = 1
    part: int = 0

    def validate(self) -> None:
        """Raise `ConfigError` (naming the parameter) for settings that cannot work."""
        from retriever.shards import DTYPES

        for name in ("shard_size", "batch_size", "text_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1.", name)
        if self.num_workers < 0:
            raise ConfigError("num_workers must be 0 or more.", "num_workers")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be {' or '.join(DTYPES)}, not {self.dtype!r}.", "dtype")
