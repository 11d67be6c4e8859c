"""Decode any image a user has into the RGB picture a CLIP model expects.

open_clip's own preprocessing calls `convert("RGB")`, which turns transparent pixels black and
clips 16-bit images to white. We normalise first: EXIF orientation applied, transparency composited
onto white, 16-bit scaled to 8-bit, CMYK / palette / grey converted. Pillow's decompression-bomb
guard stays on: a bomb is a decode error like any other.
"""

from __future__ import annotations

import functools
import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from retriever.data.limits import DEFAULT_MAX_PIXELS
from retriever.data.locations import open_location

ImageInput = Union[str, os.PathLike, bytes, Image.Image]  # noqa: UP007 (a runtime alias on 3.10)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
VECTOR_EXTENSIONS = frozenset({".svg", ".svgz"})  # not rasterised here: reported, not dropped
HEIF_EXTENSIONS = frozenset({".heic", ".heif"})  # when the optional pillow-heif is installed
_WHITE = (255, 255, 255)


# JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale still at least this big: plenty for a
# 224–448 px model input, and a 100 MP photo then costs a 1.5 MP decode.
DRAFT_SIDE = 1024


@functools.cache
def image_extensions() -> frozenset[str]:
    """File extensions read as images: IMAGE_EXTENSIONS, plus .heic/.heif when pillow-heif is
    installed (registering its Pillow opener is the one global change, made on first use)."""
    try:
        import pillow_heif
    except ImportError:
        return IMAGE_EXTENSIONS
    pillow_heif.register_heif_opener()
    return IMAGE_EXTENSIONS | HEIF_EXTENSIONS


def load_image(source: ImageInput, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a path, raw bytes or PIL image and return a fully decoded RGB image.

    Args:
        source: a file path, the file's bytes, or a PIL image. EXIF orientation is applied and
            transparency composited onto white.
        max_pixels: refuse (ValueError) an image that would decode to more pixels than this,
            before decoding it; JPEGs are first draft-scaled (see DRAFT_SIDE). None: no limit
            beyond Pillow's own decompression-bomb guard.

    Raises OSError / ValueError / Image.DecompressionBombError for undecodable input; callers that
    process batches catch these and report the file rather than stopping.
    """
    image_extensions()  # registers the HEIF opener where available (also in spawned workers)
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(source)))
    else:
        # A path, or a `TAR#key` / `PARQUET#row` location whose bytes come from a shard.
        img = Image.open(open_location(source))
    if getattr(img, "is_animated", False):
        img.seek(0)  # first frame of GIF / animated WebP
    if img.format == "JPEG" and min(img.size) > 2 * DRAFT_SIDE:
        scale = min(img.size) / DRAFT_SIDE
        img.draft(img.mode, (int(img.size[0] / scale), int(img.size[1] / scale)))
    if max_pixels is not None and img.size[0] * img.size[1] > max_pixels:
        w, h = img.size
        raise ValueError(
            f"image is {w}×{h} = {w * h / 1e6:.0f} MP, over the limit of {max_pixels / 1e6:g} MP (--max-pixels)"
        )
    img.load()  # decode now, so truncated files fail here and not inside the model's transform
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: scale to 8 bits instead of letting convert() clip everything above 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr = (arr - lo) / (hi - lo or 1.0)
        return Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info or mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode == "RGBA":
        background = Image.new("RGB", img.size, _WHITE)
        background.paste(img, mask=img.getchannel("A"))
        return background
    # CMYK, YCbCr, LAB, HSV, L, 1, P without transparency: Pillow's conversions are right.
    return img.convert("RGB")
