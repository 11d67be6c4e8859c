"""A generator of hostile inputs for `retriever embed`: every kind of file a real collection throws at it.

`make_folder(root, good)` writes a folder of images with captions; `make_manifests(root, folder)`
writes one bad manifest per format over it; `make_containers(root, good)` writes webdataset tars and
image Parquet files whose captions are bytes of every kind, structs and numbers. tests/test_bad_inputs.py checks that every item ends
embedded or reported and that none crashes the run. Grow it with each new input format.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def _jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def make_folder(root: Path, good: list[Path]) -> dict[str, str]:
    """Write the corpus under `root`; returns {relative path: "embedded" | "reported" | "not an image"}.

    `good` are a few real PNGs to derive the decodable variants from.
    """
    root.mkdir(parents=True, exist_ok=True)
    expect: dict[str, str] = {}
    src = Image.open(good[0]).convert("RGBA")

    def put(name: str, data: bytes, fate: str, caption: bytes | None = None) -> None:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if caption is not None:
            path.with_suffix(".txt").write_bytes(caption)
        expect[name] = fate

    def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    png = good[0].read_bytes()
    # Decodable variants: every one must be embedded.
    put("ok/plain.png", png, "embedded", b"a plain picture\n")
    put("ok/cmyk.jpg", encoded(src.convert("RGB").convert("CMYK"), "JPEG"), "embedded")
    grey16 = Image.fromarray(np.asarray(src.convert("L"), np.uint16) * 257)  # mode I;16
    put("ok/grey16.png", encoded(grey16, "PNG"), "embedded")
    put("ok/palette-alpha.png", encoded(src.convert("P"), "PNG", transparency=0), "embedded")
    put("ok/exif-rotated.jpg", _jpeg_with_orientation(src, 6), "embedded")
    frames = [src.convert("RGB"), src.convert("RGB").rotate(90)]
    put("ok/animated.gif", encoded(frames[0], "GIF", save_all=True, append_images=frames[1:]), "embedded")
    put("ok/photo.webp", encoded(src, "WEBP"), "embedded")
    put("ok/scan.tiff", encoded(src.convert("RGB"), "TIFF"), "embedded")
    put("ok/png named.jpg", png, "embedded")  # mislabelled but decodable
    put("odd/ spaces & ünïcödé #1.png", png, "embedded", "légende ✓".encode())
    put("odd/-leading-dash.PNG", png, "embedded")
    put("odd/bom caption.png", png, "embedded", "\ufeffwith a byte-order mark".encode())
    # Undecodable or refused: every one must be reported with a reason.
    put("bad/zero.png", b"", "reported")
    put("bad/truncated.png", png[: len(png) // 2], "reported")
    put("bad/text.jpg", b"hello, I am text", "reported")
    put("bad/bomb.png", encoded(Image.new("1", (20000, 20000)), "PNG"), "reported")  # over Pillow's limit
    put("bad/huge.png", encoded(Image.new("L", (9000, 9000), 128), "PNG"), "reported")  # over --max-pixels
    put("bad/latin1 caption.png", png, "reported", "café".encode("latin-1"))
    put("bad/binary caption.png", png, "reported", b"\x00\x01\x02")
    put("bad/logo.svg", b"<svg xmlns='http://www.w3.org/2000/svg'/>", "reported")
    os.symlink("loop.png", root / "bad" / "loop.png")
    expect["bad/loop.png"] = "reported"
    os.symlink("nowhere.png", root / "bad" / "dangling.png")
    expect["bad/dangling.png"] = "reported"
    os.symlink("..", root / "bad" / "parent-loop")  # a directory loop: the walk must not follow it
    # Not images: counted, not embedded.
    put("notes.md", b"# my notes", "not an image")
    put("bad/archive.zip", b"PK\x03\x04", "not an image")
    return expect


def make_manifests(root: Path, folder: Path) -> dict[str, tuple[int, int]]:
    """One bad manifest per format; returns {file name: (rows that must embed, rows that must be reported)}.

    A row is "reported" when the reader skips it (not an object, a caption that is not text) or
    when its image fails to decode; rows without an image path are not items at all.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = str(folder / "ok" / "plain.png")
    webp = str(folder / "ok" / "photo.webp")
    missing = str(folder / "does-not-exist.png")
    truncated = str(folder / "bad" / "truncated.png")
    out: dict[str, tuple[int, int]] = {}

    lines = [
        json.dumps({"image": good, "caption": "fine"}),
        "[1, 2, 3]",
        '"a bare string"',
        "{not json",
        json.dumps({"image": missing, "caption": "gone"}),
        json.dumps({"image": webp, "caption": ["two", "captions"]}),
        json.dumps({"image": truncated, "caption": {"a": 1}}),
    ]
    (root / "bad.jsonl").write_text("\n".join(lines) + "\n")
    out["bad.jsonl"] = (2, 5)  # fine + webp embed; 3 bad lines, a missing file, a struct caption reported

    csv = f'image,caption\n{good},"quoted, with comma"\n{missing},gone\n,no image\n{webp},\n'
    (root / "bad.csv").write_text(csv)
    out["bad.csv"] = (2, 1)
    (root / "bad.tsv").write_text(f"path\ttext\n{good}\ttab separated\n{truncated}\tbroken\n")
    out["bad.tsv"] = (1, 1)
    table = pa.table({"image": [good, webp, missing], "caption": [b"bytes caption", b"\xff\xfe\x00", None]})
    pq.write_table(table, root / "bad.parquet")
    out["bad.parquet"] = (1, 2)
    return out


def _tar_add(tf, name: str, data: bytes) -> None:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def make_containers(root: Path, good: list[Path]) -> dict[str, tuple[int, int]]:
    """Tar shards and image Parquet files with hostile captions; returns {source name: (items that must
    embed, items that must be reported)}. Captions follow the rule of every source: UTF-8 (a BOM
    dropped) or BOM-marked UTF-16 text is kept, anything else leaves its item out with the reason."""
    import tarfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir(parents=True, exist_ok=True)
    png = good[0].read_bytes()
    out: dict[str, tuple[int, int]] = {}
    samples = [  # key, .txt member, .json member, fate
        ("plain", b"a plain caption", b'{"url": "http://x/plain"}', "embedded"),
        ("bom8", "\ufeffcaf\u00e9 with a BOM".encode(), None, "embedded"),
        ("bom16", "utf-16 caf\u00e9".encode("utf-16"), None, "embedded"),
        ("json-caption", None, b'{"caption": "only in the sidecar"}', "embedded"),
        ("txt-wins", b"the txt caption", b'{"caption": 3.5}', "embedded"),  # the sidecar's number is unused
        ("latin1", "caf\u00e9".encode("latin-1"), None, "reported"),
        ("binary", b"\x00\x01\x02", None, "reported"),
        ("struct", None, b'{"caption": {"a": 1}}', "reported"),
        ("number", None, b'{"caption": 7}', "reported"),
        ("json-list", None, b"[1, 2]", "reported"),
        ("not-json", None, b"{caption: unquoted", "reported"),
        ("json-latin1", None, '{"caption": "caf\u00e9"}'.encode("latin-1"), "reported"),
    ]
    with tarfile.open(root / "captions.tar", "w") as tf:
        for key, txt, sidecar, _ in samples:
            _tar_add(tf, f"{key}.png", png)
            if txt is not None:
                _tar_add(tf, f"{key}.txt", txt)
            if sidecar is not None:
                _tar_add(tf, f"{key}.json", sidecar)
        _tar_add(tf, "cut.png", png[: len(png) // 2])  # caption fine, image undecodable
        _tar_add(tf, "cut.txt", b"truncated image")
    fates = [f for *_, f in samples] + ["reported"]
    out["captions.tar"] = (fates.count("embedded"), fates.count("reported"))

    def image_parquet(name: str, captions: pa.Array, images: list[bytes] | None = None) -> None:
        images = images or [png] * len(captions)
        pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "caption": captions}), root / name)

    binary = [b"utf-8 bytes", "\ufeffbom".encode(), "utf-16".encode("utf-16"), b"\xe9t\xe9", b"nul\x00", None]
    image_parquet("binary-captions.parquet", pa.array(binary, pa.binary()))
    out["binary-captions.parquet"] = (4, 2)  # three texts and a null caption embed; latin-1 and NUL reported
    image_parquet("struct-captions.parquet", pa.array([{"a": 1}, None, {"a": 2}]))
    out["struct-captions.parquet"] = (1, 2)  # a null struct is no caption
    image_parquet("float-captions.parquet", pa.array([1.5, float("nan"), None]))
    out["float-captions.parquet"] = (2, 1)  # NaN and null are no caption
    image_parquet("mixed.parquet", pa.array(["fine", "also fine", None]), [png, b"not an image", png])
    out["mixed.parquet"] = (2, 1)  # an image cell that does not decode
    return out


def copy_good(src: list[Path], dst: Path) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(p, dst / p.name)) for p in src]
