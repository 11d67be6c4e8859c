"""Uploaded query images (checked before the model sees them) and cached thumbnails of indexed ones."""

from __future__ import annotations

import io
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

from PIL import Image, ImageOps

from retriever.data.images import DEFAULT_MAX_PIXELS, load_image
from retriever.errors import UserError

MAX_PIXELS = DEFAULT_MAX_PIXELS  # larger images are refused as decompression bombs (PIL's own limit is ~89M)
THUMB_SIZES = (32, 2048)  # allowed thumbnail edge, pixels


class BadImage(UserError):
    """The bytes are not an image we will decode (400)."""


def decode_upload(data: bytes) -> Image.Image:
    """A fully decoded RGB image from uploaded bytes, or BadImage in one sentence."""
    if not data:
        raise BadImage("The upload is empty; send an image file.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            w, h = probe.size
            if w * h > MAX_PIXELS:
                raise BadImage(f"The image is {w}x{h} pixels, more than the {MAX_PIXELS:,} this server decodes.")
            return load_image(probe)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("The image is a decompression bomb (far more pixels than bytes); refused.") from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise BadImage("The upload is not an image this server can read (PNG, JPEG, WebP, GIF, BMP).") from None


class ThumbnailCache:
    """Resized images by (index generation, id, size), least recently used first out, bounded in bytes."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: tuple, path: Path, size: int) -> tuple[bytes, str]:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make_thumbnail(path, size)
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += len(value[0])
                while self._bytes > self.max_bytes and self._items:
                    _, (old, _) = self._items.popitem(last=False)
                    self._bytes -= len(old)
        return value


def make_thumbnail(path: Path, size: int) -> tuple[bytes, str]:
    """(bytes, media type): the image upright (EXIF orientation applied), fitting size x size.
    PNG when it has transparency, JPEG otherwise."""
    with Image.open(path) as img:
        w, h = img.size
        if w * h > MAX_PIXELS:
            raise BadImage("The indexed image is too large to thumbnail.")
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.draft("RGB", (size, size))  # JPEG: decode at reduced scale directly
        img = ImageOps.exif_transpose(img)
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
        buf = io.BytesIO()
        if has_alpha:
            img.convert("RGBA").save(buf, "PNG", optimize=False)
            return buf.getvalue(), "image/png"
        img.convert("RGB").save(buf, "JPEG", quality=85)
        return buf.getvalue(), "image/jpeg"
