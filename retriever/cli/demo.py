"""`retriever demo`: the offline end-to-end run on Twemoji."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from retriever.cli.common import (
    JsonOpt,
    WorkersOpt,
    config_from_options,
    err,
    out,
    progress_bar,
    user_errors,
    workers_or_default,
)
from retriever.demo.run import DemoConfig

# Option defaults are the library's: one source of truth (demo/run.py imports torch only when it runs).
DEMO = DemoConfig()


@user_errors
def demo(
    workspace: Path = typer.Option(
        Path(DEMO.workspace), help="Folder for data, model, shards, index and report (a rerun reuses them)."
    ),
    limit: int | None = typer.Option(
        DEMO.limit, help="Use only N emoji, and N icons with --domain (a quick, reduced demo)."
    ),
    epochs: int = typer.Option(DEMO.epochs, help="Fine-tuning epochs (heads and temperature on cached tower outputs)."),
    unlock_text_last: int = typer.Option(
        DEMO.unlock_text_last, help="Also tune the last N MiniLM layers (end to end; much slower on CPU)."
    ),
    unlock_image_last: int = typer.Option(
        DEMO.unlock_image_last, help="Also tune the last N EfficientNet blocks (on cached maps below them)."
    ),
    second_style: bool = typer.Option(
        DEMO.second_style, help="Also train on OpenMoji drawings of the training emoji (a second art style)."
    ),
    refit: bool = typer.Option(
        DEMO.refit, help="After validation picks the epoch count, retrain on training + validation for the final model."
    ),
    seed: int = typer.Option(DEMO.seed, help="Seed of the concept split and the training."),
    domain: str | None = typer.Option(
        None,
        help="Then fine-tune the demo model on a second domain (fontawesome: Font Awesome's icons) and "
        "report its held-out recall before and after.",
    ),
    workers: int | None = WorkersOpt,
    as_json: bool = JsonOpt,
):
    """Offline end to end on Twemoji: compose the default model, fine-tune, report held-out recall, index, query."""
    options = dict(locals())  # the flags are DemoConfig's fields (and --domain)
    from retriever.cli.render import TrainDisplay
    from retriever.demo.report import print_report
    from retriever.demo.run import run_demo

    cfg = config_from_options(DemoConfig, options, workers=workers_or_default(workers))
    show = err.is_terminal or os.environ.get("RETRIEVER_PROGRESS") == "1"
    with TrainDisplay(err, enabled=show) as display, progress_bar() as bar:
        task = bar.add_task("Embedding", total=None, visible=False)
        result = run_demo(
            cfg,
            display.callbacks(),
            status=display.on_status,
            embed_progress=lambda n, t: bar.update(task, completed=n, total=t, visible=True),
        )
        domain_result = None
        if domain:
            from retriever.demo.domain import run_domain_demo

            domain_result = run_domain_demo(
                workspace,
                domain,
                seed=seed,
                epochs=cfg.epochs,
                limit=cfg.limit,
                workers=cfg.workers or 0,
                refit=cfg.refit,
                train_callbacks=display.callbacks(),
                status=display.on_status,
            )
    if as_json:
        payload = dict(result.__dict__)
        if domain_result is not None:
            payload["domain"] = domain_result.__dict__
        out.print_json(json.dumps(payload))
        return
    print_report(out, result)
    if domain_result is not None:
        from retriever.demo.report import print_domain_report

        print_domain_report(out, domain_result)
