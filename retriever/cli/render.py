"""How training shows itself in a terminal: a per-epoch bar and the final tables (rich).

Kept out of train.py so the library loop only emits StepInfo/EpochInfo callbacks.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from retriever.metrics import RetrievalMetrics


class TrainDisplay:
    def __init__(self, console: Console, enabled: bool = True):
        self.console, self.enabled = console, enabled
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[stats]}"),
            console=console,
            disable=not enabled,
        )
        self.task: TaskID | None = None
        self.epoch: str | int | None = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def callbacks(self):
        from retriever.training.loop import Callbacks

        return Callbacks(
            on_step=self.on_step, on_epoch=self.on_epoch, on_status=self.on_status, on_progress=self.on_progress
        )

    def on_status(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def on_progress(self, phase: str, done: int, total: int) -> None:
        if self.task is None or self.epoch != phase:
            self.task, self.epoch = self.progress.add_task(phase, total=total, stats=""), phase
        self.progress.update(self.task, completed=done, total=total)

    def on_step(self, s) -> None:
        if self.task is None or self.epoch != s.epoch:
            self.task = self.progress.add_task(f"Epoch {s.epoch}", total=s.steps_in_epoch, stats="")
            self.epoch = s.epoch
        stats = f"loss {s.loss:.4f}  lr {s.lr:.2e}  T {s.temperature:.4f}  {s.pairs_per_second:.0f} pairs/s"
        self.progress.update(self.task, completed=s.step_in_epoch, stats=stats)

    def on_epoch(self, e) -> None:
        if e.val is None:
            return
        mark = " (best)" if e.is_best else ""
        what = "start" if e.epoch == 0 else f"epoch {e.epoch}"
        self.console.print(
            f"{what}: val t2i R@1/5/10 {_pct(e.val, 't2i')}, i2t {_pct(e.val, 'i2t')}, mean {e.val['mean_recall']:.3f}{mark}",
            highlight=False,
        )

    @staticmethod
    def history_table(result) -> Table:
        t = Table(
            "epoch",
            "train loss",
            "t2i R@1",
            "t2i R@5",
            "t2i R@10",
            "i2t R@1",
            "i2t R@5",
            "i2t R@10",
            "mean",
            "best",
            title=f"Training run {result.run_dir}",
        )
        for row in result.history:
            v = row.get("val") or {}
            cells = [
                f"{v[k]:.3f}" if k in v else "-"
                for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10", "mean_recall")
            ]
            loss = row.get("train_loss")
            t.add_row(
                str(row["epoch"]), f"{loss:.4f}" if loss is not None else "-", *cells, "✓" if row.get("best") else ""
            )
        if result.test:
            r = {
                **{f"t2i_{k}": v for k, v in result.test["text_to_image"]["recall"].items()},
                **{f"i2t_{k}": v for k, v in result.test["image_to_text"]["recall"].items()},
            }
            t.add_row(
                "test",
                "-",
                *[f"{r[k]:.3f}" for k in ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")],
                f"{result.test['mean_recall']:.3f}",
                "",
            )
        return t


def recall_table(m: RetrievalMetrics, title: str) -> Table:
    t = Table("direction", "queries", "R@1", "R@5", "R@10", "mean rank", "median rank", title=title)
    for name, d in (("text → image", m.text_to_image), ("image → text", m.image_to_text)):
        t.add_row(
            name,
            str(d.queries),
            *[f"{d.recall[k]:.3f}" for k in (1, 5, 10)],
            f"{d.mean_rank:.1f}",
            f"{d.median_rank:.1f}",
        )
    return t


def _pct(val: dict, d: str) -> str:
    return "/".join(f"{val[f'{d}_R@{k}']:.3f}" for k in (1, 5, 10))
