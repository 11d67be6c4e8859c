"""`retriever export-onnx`: write a model's text and image towers as verified ONNX files."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retriever.cli.common import JsonOpt, PretrainedOpt, err, load_encoder, out, user_errors


@user_errors
def export_onnx(
    model: str = typer.Argument(..., help="open_clip model name, a model-config JSON, or local-dir:FOLDER."),
    out_dir: Path = typer.Option(
        ..., "--out", "-o", help="Folder to write (INDEX/onnx or FOLDER/onnx are found by `search` automatically)."
    ),
    pretrained: str | None = PretrainedOpt,
    as_json: bool = JsonOpt,
):
    """Export the text and image towers to ONNX (verified against torch) for torch-free queries."""
    from retriever.onnx.export import check_out_dir, export_onnx

    check_out_dir(out_dir)  # before the model load: a wrong --out fails in a second
    encoder = load_encoder(model, pretrained, "cpu")
    with err.status("Exporting and verifying against torch…"):
        info = export_onnx(encoder, out_dir)
    if as_json:
        out.print_json(json.dumps(info))
        return
    v = info["verified"]
    out.print(
        f"Wrote {out_dir}: text.onnx and image.onnx of {encoder.identity.label()}; "
        f"max abs diff from torch {v['text_max_abs_diff']:.1e} (text), {v['image_max_abs_diff']:.1e} (image)."
    )
