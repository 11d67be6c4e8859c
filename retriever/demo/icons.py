"""A second offline domain: Font Awesome Free's solid icons, rendered from the font, named by its metadata.

The `fontawesome-free` wheel ships the icon font (`webfonts/fa-solid-900.ttf`, SIL OFL 1.1) and
`metadata/icons.yml`, which gives every icon a label ("Camera Retro") and search terms ("photo",
"picture", "record", ...). Each icon is drawn black on white with Pillow and captioned with its
label and search terms. Monochrome glyphs are a different art style and vocabulary from Twemoji's
colour emoji: what `retriever demo --domain fontawesome` fine-tunes the demo model on.
Icons CC BY 4.0 / font SIL OFL 1.1 (Fonticons, Inc.); see the package's LICENSE.txt.
"""

from __future__ import annotations

from pathlib import Path

from retriever.demo.emoji import EmojiImage
from retriever.errors import UserError

_ROOT = "fontawesome-free/static/fontawesome_free"


def fontawesome_folder() -> Path:
    """The installed package's static folder (its top-level folder name has a hyphen: not importable)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        folder = Path(str(distribution("fontawesome-free").locate_file(_ROOT)))
    except PackageNotFoundError as e:
        raise UserError(
            "The Font Awesome domain needs the `fontawesome-free` package: pip install 'retriever[demo]'."
        ) from e
    if not (folder / "webfonts" / "fa-solid-900.ttf").is_file():
        raise UserError(f"{folder} has no webfonts/fa-solid-900.ttf; reinstall fontawesome-free.")
    return folder


def draw_glyph(font, glyph: str, size: int):
    """`glyph` of an icon font drawn black on white, its ink box centred in a `size`-pixel square."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), glyph, font=font)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), glyph, font=font, fill="black")
    return img


def fontawesome_collection(out: str | Path, size: int = 96) -> list[EmojiImage]:
    """Render every solid-style icon to `out/NAME.png` (once) and return them with their captions.

    Captions: the label in lower case first, then the search terms that differ from it.
    """
    import yaml  # type: ignore[import-untyped]
    from PIL import ImageFont

    folder = fontawesome_folder()
    meta = yaml.safe_load(
        (folder / "js-packages" / "@fortawesome" / "fontawesome-free" / "metadata" / "icons.yml").read_text("utf-8")
    )
    font = ImageFont.truetype(str(folder / "webfonts" / "fa-solid-900.ttf"), int(size * 0.75))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for name in sorted(meta):
        icon = meta[name]
        if "solid" not in icon.get("styles", []):
            continue
        path = out / f"{name}.png"
        if not path.is_file():
            img = draw_glyph(font, chr(int(str(icon["unicode"]), 16)), size)
            tmp = path.with_suffix(".png.tmp")
            img.save(tmp, format="PNG")
            tmp.replace(path)
        captions = [str(icon["label"]).lower()]
        for term in (icon.get("search") or {}).get("terms") or []:
            term = " ".join(str(term).replace("-", " ").split()).lower()
            if term and term not in captions:
                captions.append(term)
        items.append(EmojiImage(name, str(path), tuple(captions)))
    return items
