"""The `retriever` command: a dispatch table over one module per command (each a thin layer over the library)."""

from __future__ import annotations

import os
import sys

import typer

from retriever.cli import (
    dedup,
    demo,
    embed,
    evaluate,
    export,
    export_onnx,
    import_,
    index,
    info,
    search,
    serve,
    train,
)
from retriever.cli.common import quiet_library_logs

app = typer.Typer(
    help="Contrastive cross-modal retrieval: embed image collections, index them, search by text or image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def quiet_libraries() -> None:
    """Contrastive cross-modal retrieval: embed image collections, index them, search by text or image."""
    # Runs before every command, not at import: importing retriever.cli changes nothing global.
    # transformers' load reports and hub progress bars are noise on our console; users can override.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    quiet_library_logs()


app.command(name="embed")(embed.embed)
app.command(name="index")(index.index)
app.command(name="search")(search.search)
app.command(name="info")(info.info)
app.command(name="train")(train.train)
app.command(name="eval")(evaluate.eval_cmd)
app.command(name="demo")(demo.demo)
app.command(name="dedup")(dedup.dedup)
app.command(name="import")(import_.import_cmd)
app.command(name="export")(export.export)
app.command(name="export-onnx")(export_onnx.export_onnx)
app.command(name="serve")(serve.serve)


def main() -> None:  # pragma: no cover - console-script entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
