"""`retriever dedup`: near-duplicate groups of a whole shard collection, written to Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from retriever.cli.common import JsonOpt, Modality, err, out, progress_bar, user_errors


@user_errors
def dedup(
    shards: Path = typer.Argument(..., help="Shard folder written by `retriever embed`."),
    out_file: Path = typer.Option(..., "--out", "-o", help="Parquet file of the groups (written atomically)."),
    threshold: float = typer.Option(
        0.95, "--threshold", "-t", help="Cosine similarity at which two rows are duplicates."
    ),
    modality: Modality = typer.Option(Modality.image, help="Compare image vectors (default) or caption vectors."),
    nprobe: int = typer.Option(8, "--nprobe", help="Inverted lists searched per row (large collections)."),
    as_json: bool = JsonOpt,
):
    """Find near-duplicate groups (cosine ≥ threshold, joined transitively); one representative each."""
    from retriever.dedup import find_duplicates

    with progress_bar() as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task("Indexing" if stage == "index" else "Comparing", total=total)
            bar.update(tasks[stage], completed=done)

        result = find_duplicates(shards, out_file, threshold, modality=modality.value, nprobe=nprobe, progress=progress)
    if as_json:
        out.print_json(json.dumps(result.to_dict()))
        return
    err.print(
        f"{result.rows} rows: {result.groups} near-duplicate groups, {result.duplicates} rows beyond their group's "
        f"representative ({result.index}, {result.seconds:.1f}s) → {result.out}",
        highlight=False,
    )
