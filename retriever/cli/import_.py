"""`retriever import`: bring embeddings made by another tool into shards, without re-embedding."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from retriever.cli.common import (
    DeviceOpt,
    JsonOpt,
    ModelOpt,
    PretrainedOpt,
    WaitOpt,
    load_encoder,
    note,
    out,
    user_errors,
)


class ImportFormat(str, Enum):
    clip_retrieval = "clip-retrieval"


@user_errors
def import_cmd(
    fmt: ImportFormat = typer.Argument(..., metavar="FORMAT", help="clip-retrieval: img_emb/, text_emb/, metadata/."),
    folder: Path = typer.Argument(..., help="The other tool's output folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="New (or empty) folder for the shards, written as a whole."),
    model: str | None = ModelOpt,
    pretrained: str | None = PretrainedOpt,
    dtype: str = typer.Option("float32", help="Embedding storage type: float32 or float16."),
    device: str | None = DeviceOpt,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an --out that already holds shards."),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
):
    """Import embeddings (the folder does not say which model made them: name it with --model/--pretrained)."""
    from retriever.interop.clip_retrieval import check_import_out, import_clip_retrieval
    from retriever.models.encode import encode_texts

    check_import_out(out_dir.expanduser(), overwrite)  # before the model loads: a refusal costs nothing
    encoder = load_encoder(model, pretrained, device)
    result = import_clip_retrieval(
        folder,
        out_dir,
        encoder.identity,
        dtype,
        encode_texts=lambda texts: encode_texts(encoder, texts, 256),
        overwrite=overwrite,
        wait=wait,
        on_message=note,
    )
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(
        f"Imported {result['rows']} rows ({result['rows_with_text']} with text) into {result['shards']} "
        f"shards at {result['out_dir']}."
    )
