"""`retriever serve`: the HTTP search service and web page over one or more index folders."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from retriever.cli.common import err, field_defaults, user_errors
from retriever.errors import UserError
from retriever.serve.config import ServeConfig

# Option defaults are the library's: one source of truth (serve/config.py is stdlib only).
SERVE = field_defaults(ServeConfig)

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def format_size(n: int) -> str:
    """The shortest size string `parse_size` reads back as n bytes (20M for 20 << 20)."""
    for unit in ("G", "M", "K"):
        if n % _SIZE_UNITS[unit] == 0:
            return f"{n // _SIZE_UNITS[unit]}{unit}"
    return str(n)


@user_errors
def serve(
    indexes: list[str] = typer.Argument(..., help="Index folders, each served under its folder name or as NAME=PATH."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface; set an API key)."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key_file: Path | None = typer.Option(
        None, help="File holding the API key; then every route but /healthz needs Authorization: Bearer KEY."
    ),
    cors_origin: list[str] = typer.Option(
        [], help="Browser origin allowed to call the API (repeatable), e.g. the clip front's http://localhost:1234."
    ),
    max_upload: str = typer.Option(
        format_size(SERVE["max_upload"]), help="Largest request body (K, M or G suffix); larger ones get 413."
    ),
    batch_window_ms: float = typer.Option(
        SERVE["batch_window_ms"], help="How long a text query waits to share an encoder pass."
    ),
    no_batching: bool = typer.Option(
        not SERVE["batching"], "--no-batching", help="Encode every text query on its own."
    ),
    allow_image_urls: bool = typer.Option(
        SERVE["allow_image_urls"],
        "--allow-image-urls",
        help="Fetch image_url queries (public addresses only, 10 s, --max-upload cap).",
    ),
    watch_seconds: float = typer.Option(
        SERVE["watch_seconds"], help="How often to check index manifests for a reload (0: never)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to encode queries (default: the one named in each index)."
    ),
    pretrained: str | None = typer.Option(None, "--pretrained", "-p", help="Pretrained tag or weights file."),
    backend: str = typer.Option(
        SERVE["backend"], help="Query encoder: auto (the index's ONNX export if usable), onnx (required), or torch."
    ),
    log_level: str = typer.Option("info", help="uvicorn log level."),
):
    """Serve indexes over HTTP: a web page at /, the API at /v1 (docs at /docs), clip-retrieval's routes."""
    import uvicorn

    from retriever.serve.app import create_app

    specs = [parse_index_spec(s) for s in indexes]
    key = read_api_key(api_key_file) if api_key_file else None
    if host not in ("127.0.0.1", "localhost", "::1") and key is None:
        err.print(
            f"[yellow]Warning:[/yellow] listening on {host} without an API key: anyone who can reach this "
            "machine can search these indexes and read their images. Use --api-key-file.",
            highlight=False,
        )
    encoder = None
    if model:
        from retriever.cli.common import load_encoder

        encoder = load_encoder(model, pretrained)
    config = ServeConfig(
        indexes=specs,
        api_key=key,
        cors_origins=list(cors_origin),
        max_upload=parse_size(max_upload),
        batching=not no_batching,
        batch_window_ms=batch_window_ms,
        watch_seconds=watch_seconds,
        allow_image_urls=allow_image_urls,
        backend=backend,
        model=encoder,
    )
    with err.status("Loading model and indexes…"):
        app = create_app(config)
    shown = f"[{host}]" if ":" in host else host
    err.print(f"Serving {', '.join(n for n, _ in specs)} at http://{shown}:{port}/  (API docs: /docs; Ctrl-C stops)")
    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)


def parse_index_spec(spec: str) -> tuple[str, Path]:
    """'NAME=PATH' or 'PATH' (named after its folder)."""
    name, sep, path = spec.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or Path(spec).exists():
        name, path = "", spec
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise UserError(f"Index folder {folder} does not exist.")
    name = name or folder.resolve().name
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise UserError(f"Index name {name!r} must be letters, digits, '.', '_' or '-'; name it with NAME=PATH.")
    return name, folder


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"--max-upload {text!r} is not a size like 20M.")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def read_api_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as e:
        raise UserError(f"Could not read the API key file {path}: {e.strerror}.") from None
    if len(key) < 16:
        raise UserError(f"The API key in {path} is shorter than 16 characters; use a long random one.")
    return key
