"""What every command shares: consoles, the user-error wrapper, common options, model loading."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from retriever.errors import ConfigError, UserError
from retriever.skipped import SkippedImages

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


# Library parameters whose flag is not simply the parameter name with dashes.
_FLAGS = {"num_workers": "--workers", "use_gpu": "--gpu", "out": "--out"}


class _DropOpenClipChatter(logging.Filter):
    """open_clip logs its load reports (and harmless warnings) on the root logger itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or f"{os.sep}open_clip{os.sep}" not in record.pathname


def quiet_library_logs() -> None:
    """Silence open_clip's and timm's chatter below ERROR, and only theirs: retriever's own
    warnings (e.g. a skipped training image) still reach the console."""
    root = logging.getLogger()
    if not any(isinstance(f, _DropOpenClipChatter) for f in root.filters):
        root.addFilter(_DropOpenClipChatter())
    for name in ("open_clip", "timm"):
        logging.getLogger(name).setLevel(logging.ERROR)


def flag_name(param: str) -> str:
    """The command-line flag of a library parameter: its keyword argument, dashed (few exceptions)."""
    return _FLAGS.get(param, "--" + param.replace("_", "-"))


def user_errors(fn):
    """Turn a UserError into one red sentence and exit status 1, not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            message = e.renamed(flag_name) if isinstance(e, ConfigError) else str(e)
            err.print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
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
PrecisionOpt = typer.Option(
    None, "--precision", help="fp32 (CPU), fp16 or bf16 (GPU; default bf16 where supported, else fp16)."
)
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables.")
WaitOpt = typer.Option(
    False, "--wait", help="If another retriever process is writing the same folder, wait for it instead of refusing."
)
WorkersOpt = typer.Option(
    None,
    help="Image-decoding worker processes (default: cores - 2, at most 4, on a CPU-only machine; 0 decodes in the main process).",
)


def note(message: str) -> None:
    """A line about what a command is doing (waiting for a lock, cleaning after a killed run), on stderr."""
    err.print(message, highlight=False)


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


def print_skipped(skipped: SkippedImages, samples: int = 5) -> None:
    """The one way a command reports skipped images: the count, where the list is, the first few."""
    if not skipped:
        return
    err.print(f"[yellow]{skipped.summary()}[/yellow]", highlight=False)
    for e in skipped.entries[:samples]:
        err.print(f"  {e['path']}: {e['reason']}", highlight=False)


def field_defaults(cls: type) -> dict[str, Any]:
    """A dataclass's plain field defaults by name, for option defaults taken from the library
    (fields without a default, or with a default factory, are left out)."""
    return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}


def config_from_options(cls: type, options: Mapping[str, Any], **overrides: Any) -> Any:
    """`cls` filled from a command's options (its `locals()`): every option named like a field passes
    through (paths as text, choices as their value); `overrides` set the fields named otherwise.
    Fields with no option keep their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: _plain(v) for k, v in options.items() if k in names}
    return cls(**{**values, **overrides})


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    return value.value if isinstance(value, Enum) else value
