"""`retriever demo --domain fontawesome`: fine-tune the demo model on a small new domain, measure the lift.

The emoji demo's tuned model (trained on Twemoji's colour emoji) meets Font Awesome's black
glyphs and their search terms (retriever.demo.icons). The icons are split by concept, seeded:
40 % held out for the final figures only, 15 % of the rest to choose the epoch, and the rest (a
few hundred icons) to train on with the same recipe `retriever demo` uses (`demo_train_config`),
starting from the demo model, plus the last EfficientNet block (trained on cached maps below it):
black glyphs are far from the colour pictures the trunk and the emoji heads know. Validation
preferred it slightly (+0.4 points of mean recall over four runs, one of them a tie; see
benchmarks/RESULTS.md). Held-out recall is reported before and after, with the R@10 lift.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from retriever.atomic import write_json_atomic
from retriever.demo.emoji import limit_items, split_and_write

DOMAINS = ("fontawesome",)


@dataclass
class DomainResult:
    domain: str
    base_model: str
    model: str
    train_images: int
    val_images: int
    heldout_images: int
    before: dict  # held-out RetrievalMetrics.flat() of the demo model
    after: dict  # ... of the fine-tuned model (epoch chosen on validation)
    best_epoch: int
    seconds: dict[str, float] = field(default_factory=dict)
    refit: bool = False  # the final model was refit on train + validation for best_epoch epochs

    def lift(self, key: str = "t2i_R@10") -> float:
        return self.after[key] / max(self.before[key], 1e-9)


def run_domain_demo(
    workspace: str | Path,
    domain: str = "fontawesome",
    *,
    seed: int = 0,
    epochs: int | None = None,
    limit: int | None = None,
    workers: int = 0,
    unlock_image_last: int = 1,
    refit: bool = True,
    train_callbacks=None,
    status: Callable[[str], None] | None = None,
) -> DomainResult:
    """Fine-tune `workspace`'s demo model (run `retriever demo` first) on `domain`; see the module doc.

    `unlock_image_last`: EfficientNet blocks (from the end) tuned with the heads, at cache speed; 0
    tunes the heads only. `refit`: the final model trains on training + validation icons for the
    epoch count validation chose (see `DemoConfig.refit`). `epochs` defaults to the demo's.
    `limit`: use a seeded sample of N icons (a quick, reduced run).
    """
    from retriever.demo.icons import fontawesome_collection
    from retriever.demo.run import (
        DemoConfig,
        chosen_querybank,
        demo_model_folder,
        demo_train_config,
        heldout_recall,
        refit_train_and_val,
        train_or_reuse,
    )
    from retriever.errors import UserError
    from retriever.models.load import load_model

    say = status or (lambda s: None)
    if domain not in DOMAINS:
        raise UserError(f"Unknown --domain {domain!r}; choose one of {', '.join(DOMAINS)}.")
    ws = Path(workspace).expanduser().resolve()  # absolute paths in manifests (see run_demo)
    base = demo_model_folder(ws)
    if base is None:
        raise UserError(f"{ws} has no demo model yet: run `retriever demo --workspace {ws}` first.")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    folder = ws / domain
    items = limit_items(fontawesome_collection(folder / "png"), limit, seed, "icons")
    train_items, val_items, heldout, line = split_and_write(items, folder, 0.4, 0.15, seed, "Font Awesome icons")
    say(line)
    seconds["data"] = time.perf_counter() - t

    t = time.perf_counter()
    run = folder / "run"
    defaults = DemoConfig(seed=seed, unlock_image_last=unlock_image_last, refit=refit)
    features = folder / "features"  # shared by the fine-tune, the refit and the held-out measurement
    tcfg = demo_train_config(
        defaults,
        source=folder / "train.jsonl",
        val=folder / "val.jsonl",
        out=run,
        feature_cache=features,
        n_train=len(train_items),
        workers=workers,
        epochs=epochs or defaults.epochs,
        seed=seed,
        model=f"local-dir:{base}",
    )
    blocks = f" and its last {unlock_image_last} EfficientNet block(s)" if unlock_image_last else ""
    history = train_or_reuse(tcfg, f"Fine-tuning the demo model's heads{blocks} on the icons", train_callbacks, say)
    best_epoch = max(h["epoch"] for h in history if h["best"])
    seconds["train"] = time.perf_counter() - t
    final = run / "best"
    refit = refit and best_epoch > 0
    if refit:  # as the emoji demo: the chosen epoch count, on training + validation icons
        t = time.perf_counter()
        final = refit_train_and_val(
            defaults,
            train_items + val_items,
            folder / "train+val.jsonl",
            folder / "refit",
            f"local-dir:{base}",
            best_epoch,
            feature_cache=features,
            workers=workers,
            querybank=chosen_querybank(run),
            callbacks=train_callbacks,
            say=say,
        )
        seconds["refit"] = time.perf_counter() - t

    t = time.perf_counter()
    say(f"Held-out recall of the demo model and the fine-tuned one ({len(heldout)} icons never used before)")
    before, after = heldout_recall(
        load_model(f"local-dir:{final}"), load_model(f"local-dir:{base}"), folder / "heldout.jsonl", features
    )
    seconds["heldout"] = time.perf_counter() - t
    out = DomainResult(
        domain,
        f"local-dir:{base}",
        f"local-dir:{final}",
        len(train_items),
        len(val_items),
        len(heldout),
        before,
        after,
        best_epoch,
        seconds,
        refit,
    )
    write_json_atomic(folder / "report.json", asdict(out))
    return out
