"""What every command shares: consoles, the user-error wrapper, common options, model loading."""

from __future__ import annotations

import functools
import logging
import os
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from retriever.errors import UserError

out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 160)


class Modality(str, Enum):
    image = "image"
    text = "text"


class IndexType(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"
    ivfpq = "ivfpq"
    opq = "opq"


def user_errors(fn):
    """Turn a UserError into one red sentence and exit status 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        logging.getLogger().setLevel(logging.ERROR)  # open_clip logs chatty warnings on the root logger
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            err.print(f"[red]Error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err.print("Interrupted; rerun the same command to resume.")
            raise typer.Exit(130) from None

    return wrapper


ModelOpt = typer.Option(
    None, "--model", "-m", help="open_clip model name (default ViT-B-32), a model-config JSON, or local-dir:FOLDER."
)
PretrainedOpt = typer.Option(
    None,
    "--pretrained",
    "-p",
    help="Pretrained tag (default laion2b_s34b_b79k for ViT-B-32), a weights file, or 'random'.",
)
DeviceOpt = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available).")
PrecisionOpt = typer.Option(None, "--precision", help="fp32 (CPU), fp16 or bf16 (GPU; default fp16 there).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
WorkersOpt = typer.Option(
    None,
    help="Image-decoding worker processes (default: cores - 2, at most 4, on a CPU-only machine; 0 decodes in the main process).",
)


def workers_or_default(n: int | None) -> int:
    from retriever.data.loading import default_workers

    return default_workers() if n is None else n


def progress_bar():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not err.is_terminal and os.environ.get("RETRIEVER_PROGRESS") != "1",
    )


def load_encoder(model: str | None, pretrained: str | None, device=None, precision=None):
    from retriever.models.load import DEFAULT_MODEL, load_model

    with err.status(f"Loading model {model or DEFAULT_MODEL}…"):
        return load_model(model or DEFAULT_MODEL, pretrained, device=device, precision=precision)


class Loss(str, Enum):
    infonce = "infonce"
    siglip = "siglip"


def path_str(p: Path | None) -> str | None:
    return None if p is None else str(p)


def report_skipped(items) -> None:
    """What reading a source skipped (bad tars, members without images, duplicate keys), on stderr."""
    skipped = getattr(items, "skipped", None) or []
    if skipped:
        err.print(
            f"[yellow]Skipped {len(skipped)} unreadable tar(s)/member(s)/file(s) while reading the source:[/yellow]"
        )
        for p in skipped[:10]:
            err.print(f"  {p['path']}: {p['reason']}", highlight=False)
        if len(skipped) > 10:
            err.print(f"  ... and {len(skipped) - 10} more", highlight=False)
