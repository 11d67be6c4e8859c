"""`retriever export`: shards in another tool's layout."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from retriever.cli.common import JsonOpt, WaitOpt, note, out, user_errors


class ExportFormat(str, Enum):
    clip_retrieval = "clip-retrieval"


@user_errors
def export(
    shards: Path = typer.Argument(..., help="Shard folder written by `retriever embed` or `import`."),
    fmt: ExportFormat = typer.Option(..., "--format", help="clip-retrieval: img_emb/, text_emb/, metadata/ (float16)."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write: new, empty or an earlier export (replaced atomically)."
    ),
    wait: bool = WaitOpt,
    as_json: bool = JsonOpt,
):
    """Export shards for another tool (clip-retrieval's inference layout)."""
    from retriever.interop.clip_retrieval import export_clip_retrieval

    result = export_clip_retrieval(shards, out_dir, wait=wait, on_message=note)
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"Exported {result['rows']} rows in {result['partitions']} partitions to {result['out_dir']}.")
