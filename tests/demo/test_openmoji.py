"""OpenMoji drawings of emoji: the demo's second art style."""

from PIL import Image

from retriever.demo.emoji import EmojiImage, emoji_collection
from retriever.demo.openmoji import openmoji_images


def _items(*chars: str) -> list[EmojiImage]:
    by_char = {it.char: it for it in emoji_collection()}
    return [by_char[c] for c in chars]


def test_draws_each_emoji_once_in_colour_and_skips_what_the_font_lacks(tmp_path):
    items = _items("\u2764\ufe0f", "\U0001f680", "\U0001f469\u200d\U0001f680")  # red heart, rocket, woman astronaut
    items.append(EmojiImage("\U000f0001", "none.png", ("not an emoji",)))  # private use: the font has no glyph
    drawn = openmoji_images(items, tmp_path)
    assert set(drawn) == {it.char for it in items[:3]}
    heart = Image.open(drawn["\u2764\ufe0f"]).convert("RGB")
    assert heart.size == (72, 72)
    r, g, b = heart.getpixel((36, 36))  # the heart's middle is red, not black or white
    assert r > 150 and g < 100 and b < 100
    # One picture per emoji: the ZWJ sequence is one glyph, not a woman beside a rocket.
    astronaut = Image.open(drawn["\U0001f469\u200d\U0001f680"]).convert("L")
    ink_columns = [x for x in range(72) if any(astronaut.getpixel((x, y)) < 200 for y in range(72))]
    assert max(ink_columns) - min(ink_columns) < 66
    # Drawn once: a second call reuses the files (no rewrite), and no temp file is left.
    stamp = {c: p for c, p in drawn.items()}
    mtimes = {c: (tmp_path / p.rsplit("/", 1)[-1]).stat().st_mtime_ns for c, p in stamp.items()}
    assert openmoji_images(items, tmp_path) == drawn
    assert {c: (tmp_path / p.rsplit("/", 1)[-1]).stat().st_mtime_ns for c, p in stamp.items()} == mtimes
    assert not list(tmp_path.glob("*.tmp"))
