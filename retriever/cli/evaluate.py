"""`retriever eval`: recall of a model on image–caption pairs."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retriever.cli.common import (
    DeviceOpt,
    JsonOpt,
    PrecisionOpt,
    PretrainedOpt,
    WorkersOpt,
    load_encoder,
    out,
    print_skipped,
    progress_bar,
    user_errors,
    workers_or_default,
)


@user_errors
def eval_cmd(
    model: str = typer.Argument(..., help="Model: local-dir:FOLDER (e.g. RUN_DIR/best), a hub name, or a config JSON."),
    source: Path = typer.Argument(..., help="Image–caption pairs: a folder with .txt captions or a manifest."),
    pretrained: str | None = PretrainedOpt,
    image_column: str | None = typer.Option(None, help="Manifest column with image paths."),
    caption_column: str | None = typer.Option(None, help="Manifest column with captions."),
    batch_size: int = typer.Option(64, help="Images per model forward."),
    workers: int | None = WorkersOpt,
    device: str | None = DeviceOpt,
    precision: str | None = PrecisionOpt,
    as_json: bool = JsonOpt,
    querybank: bool = typer.Option(
        True,
        "--querybank/--no-querybank",
        help="Rank with the model folder's querybank, as searches of an index built from it do (when it has one).",
    ),
):
    """Recall@1/5/10 and mean/median rank, text→image and image→text, of MODEL on SOURCE."""
    from retriever.cli.render import recall_table
    from retriever.data.sources import read_source
    from retriever.evaluation import evaluate
    from retriever.querybank import model_querybank

    items = read_source(source, image_column=image_column, caption_column=caption_column)
    encoder = load_encoder(model, pretrained, device, precision)
    bank = model_querybank(encoder.identity.name, encoder.identity.weights_sha256) if querybank else None
    with progress_bar() as bar:
        task = bar.add_task("Encoding", total=len(items))
        result = evaluate(
            encoder,
            items,
            batch_size=batch_size,
            workers=workers_or_default(workers),
            progress=lambda n, t: bar.update(task, completed=n, total=t),
            querybank=bank,
        )
    ranked = {"querybank_tau": bank.tau if bank is not None else None}
    if as_json:
        out.print_json(json.dumps({"model": encoder.identity.to_dict(), **ranked, **result.to_dict()}))
        return
    how = f", querybank tau {bank.tau}" if bank is not None else ""
    out.print(recall_table(result.metrics, f"{encoder.identity.label()} on {source}{how}"))
    print_skipped(result.skipped)
