"""How `retriever demo` shows its result: recall before/after, example hits, what to try next."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from retriever.demo.run import R5_BAR, DemoResult

_KEYS = ("t2i_R@1", "t2i_R@5", "t2i_R@10", "i2t_R@1", "i2t_R@5", "i2t_R@10")


def _before_after(title: str, *rows: tuple[str, dict]) -> Table:
    """Held-out recall (percent) of each (model label, RetrievalMetrics.flat()) row."""
    t = Table(title=title)
    t.add_column("model", no_wrap=True)
    for k in _KEYS:
        t.add_column(k.replace("_", " "), justify="right")
    for label, metrics in rows:
        t.add_row(label, *[f"{100 * metrics[k]:.1f}%" for k in _KEYS])
    return t


def querybank_line(after: dict, whose: str = "Tuned") -> str | None:
    """One sentence on querybank ranking of a model's figures (`heldout_recall`), or None."""
    tau, plain = after.get("querybank_tau"), after.get("plain")
    if tau is None or not plain:
        return None
    figures = (
        " / ".join(f"{100 * plain[k]:.1f}" for k in _KEYS[:3]),
        " / ".join(f"{100 * plain[k]:.1f}" for k in _KEYS[3:]),
    )
    return (
        f"{whose} figures rank with querybank normalisation (tau {tau}, chosen on validation), as searches of its "
        f"index do; by plain cosine they would be t2i {figures[0]}, i2t {figures[1]} (R@1/5/10, %)."
    )


def print_report(console: Console, r: DemoResult) -> None:
    tuned = f"tuned ({r.best_epoch} epochs, refit)" if r.refit else f"tuned (epoch {r.best_epoch})"
    title = (
        f"Held-out recall: {r.heldout_images} emoji never seen in training nor used for any choice "
        "(gallery = those emoji)"
    )
    console.print(_before_after(title, ("untrained heads", r.before), (tuned, r.after)))
    line = querybank_line(r.after)
    if line:
        console.print(line, highlight=False)
    console.print(
        f"Epoch {r.best_epoch} was chosen by recall on {r.val_images} validation emoji carved out of the training "
        f"emoji (validation mean recall {100 * r.val['mean_recall']:.1f}%); the held-out emoji were measured once, "
        "after every choice was made."
        + (
            f" The model measured was then refit on training + validation emoji for {r.best_epoch} epochs."
            if r.refit
            else ""
        ),
        highlight=False,
    )
    for style, figures in r.heldout_styles.items():
        console.print(
            _before_after(
                f"The same held-out emoji drawn in {style}'s style ({figures['images']} pictures)",
                ("untrained heads", figures["before"]),
                (tuned, figures["after"]),
            )
        )
    verdict = "meets" if r.passed_bar else "[red]misses[/red]"
    console.print(f"Held-out text→image R@5 = {100 * r.after['t2i_R@5']:.1f}% ({verdict} the {100 * R5_BAR:.0f}% bar)")

    hits = Table("query", "hit 1", "hit 2", "hit 3", title="Text → image over all emoji")
    for q, res in r.text_examples.items():
        hits.add_row(q, *[f"{h['caption']} ({h['score']:.2f})" for h in res])
    console.print(hits)
    i2t = Table("held-out image", "true name", "hit 1", "hit 2", "hit 3", title="Image → text (caption index)")
    for ex in r.image_examples:
        i2t.add_row(
            ex["image"].rsplit("/", 1)[-1], ex["truth"], *[f"{h['caption']} ({h['score']:.2f})" for h in ex["hits"]]
        )
    console.print(i2t)
    console.print(f"Tuned model: {r.model}\nShards: {r.shards}\nIndex: {r.index}")
    console.print("Try it yourself:", highlight=False)
    console.print(f'  retriever search {r.index} "a yellow star"', highlight=False)
    console.print(
        f"  retriever search {r.index} --image {r.image_examples[0]['image'] if r.image_examples else 'IMAGE.png'} --modality text",
        highlight=False,
    )
    console.print(f"  retriever embed MY_IMAGES --out my.shards --model {r.model}", highlight=False)
    console.print("Serve it (web page and HTTP API, model loaded once):", highlight=False)
    console.print(f"  retriever serve {r.index}", highlight=False)


def print_domain_report(console: Console, r) -> None:
    """Held-out recall on the second domain: the demo model as it is, then fine-tuned on the domain."""
    title = f"{r.domain}: held-out recall on {r.heldout_images} items never used in training nor for any choice"
    tuned = (
        f"refit on {r.train_images + r.val_images} ({r.best_epoch} epochs)"
        if r.refit
        else f"fine-tuned on {r.train_images} (epoch {r.best_epoch})"
    )
    console.print(_before_after(title, ("demo model", r.before), (tuned, r.after)))
    for whose, figures in (("The demo model's", r.before), ("The fine-tuned model's", r.after)):
        line = querybank_line(figures, whose)
        if line:
            console.print(line, highlight=False)
    console.print(
        f"Held-out R@10 lift: text→image {r.lift('t2i_R@10'):.2f}×, image→text {r.lift('i2t_R@10'):.2f}× "
        f"(epoch count chosen on {r.val_images} validation items"
        + (", then refit on training + validation" if r.refit else "")
        + f"). Fine-tuned model: {r.model}",
        highlight=False,
    )
