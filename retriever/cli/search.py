"""`retriever search`: text or image queries against an index."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from retriever.cli.common import DeviceOpt, JsonOpt, Modality, PretrainedOpt, err, load_encoder, out, user_errors
from retriever.errors import UserError


@user_errors
def search(
    index_dir: Path = typer.Argument(..., help="Index folder written by `retriever index`."),
    query: str | None = typer.Argument(None, help="Text query (or use --image)."),
    image: Path | None = typer.Option(None, "--image", "-i", help="Query image file."),
    modality: Modality = typer.Option(Modality.image, help="What to retrieve: image (default) or text (captions)."),
    k: int = typer.Option(10, "-k", help="Number of results."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to encode the query (default: the one named in the index)."
    ),
    pretrained: str | None = PretrainedOpt,
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="Query encoder: auto (the index's ONNX export when one matches, else torch), onnx (error without one) or torch.",
    ),
):
    """Search an index: text → image, image → text, image → image."""
    from retriever.search import Retriever

    if (query is None) == (image is None):
        raise UserError("Give a text query or --image PATH (exactly one).")
    if image is not None and not image.is_file():
        raise UserError(f"Query image {image} does not exist.")
    encoder = load_encoder(model, pretrained, device) if model else None
    r = Retriever(index_dir, encoder, device=device, backend=backend)
    if encoder is None:
        with err.status("Loading model…"):
            r.query_encoder.prepare("image" if image is not None else "text")
    if r.query_encoder.note:
        err.print(f"[yellow]{r.query_encoder.note}[/yellow]", highlight=False)
    results = r.search(text=query, image=image, k=k, modality=modality.value)
    if as_json:
        out.print_json(json.dumps([x.to_dict() for x in results]))
        return
    table = Table("rank", "score", "id", "caption", "path", title=f"{modality.value} results for {query or image}")
    for x in results:
        table.add_row(str(x.rank), f"{x.score:.4f}", str(x.id), x.caption or "", x.path)
    out.print(table)
