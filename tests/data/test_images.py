import io

import numpy as np
import pytest
from PIL import Image

from retriever.data.images import load_image


def _png_bytes(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_transparent_pixels_become_white_not_black():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    img.putpixel((0, 0), (0, 0, 255, 255))
    out = load_image(_png_bytes(img))
    assert out.mode == "RGB"
    assert out.getpixel((5, 5)) == (255, 255, 255)
    assert out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_with_transparency_composited_on_white():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.putpixel((1, 1), 1)
    out = load_image(_png_bytes(img, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (255, 0, 0)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)  # mid grey in 16 bits
    out = load_image(_png_bytes(Image.fromarray(arr)))
    r, g, b = out.getpixel((0, 0))
    assert r == g == b and 120 <= r <= 135


def test_cmyk_grey_and_bw_convert_to_rgb():
    for img in (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), Image.new("L", (4, 4), 7), Image.new("1", (4, 4), 1)):
        out = load_image(img)
        assert out.mode == "RGB" and out.size == (4, 4)
    assert load_image(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (6, 3), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = load_image(_png_bytes(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (3, 6)


def test_truncated_and_junk_raise(tmp_path):
    good = _png_bytes(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(OSError):
        load_image(good[: len(good) // 2])
    with pytest.raises(OSError):
        load_image(b"not an image")


def test_decompression_bomb_guard_stays_on(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        load_image(_png_bytes(Image.new("RGB", (32, 32))))
