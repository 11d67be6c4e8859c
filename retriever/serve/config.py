"""What `retriever serve` decides at start-up: `ServeConfig` (stdlib only, so the CLI takes its
option defaults from here without importing FastAPI or faiss; `retriever.serve.app` re-exports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ServeConfig:
    """Everything `retriever serve` decides at start-up.

    indexes: (name, folder) pairs, served in this order (the first is the default).
    api_key: when set, every route but /healthz and the page's files needs `Authorization: Bearer KEY`.
    cors_origins: origins allowed to call from a browser (the clip front on another port); none by default.
    max_upload: largest request body in bytes (413 above).
    batching / batch_window_ms: dynamic batching of text queries.
    watch_seconds: how often manifests are checked for a reload (0: only POST .../reload).
    allow_image_urls: fetch `image_url` queries (public addresses only, timeout, size cap); off by default.
    backend: what encodes queries: "auto" (the index's ONNX export when usable, else torch), "onnx"
        (refuse to start without a usable export) or "torch" (the model itself, e.g. on a GPU).
    """

    indexes: list[tuple[str, Path]]
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_upload: int = 20 << 20
    batching: bool = True
    batch_window_ms: float = 3.0
    watch_seconds: float = 2.0
    allow_image_urls: bool = False
    backend: str = "auto"
    model: object | None = None  # an already loaded encoder to share (tests, benchmarks)
