"""Where image–caption pairs come from: a folder of images, or a manifest file.

A source is a list of `SourceItem`s in a deterministic order. The position in that order becomes
the row's `id`, which is what makes ids stable when an interrupted `embed` resumes.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retriever.data.images import IMAGE_EXTENSIONS, VECTOR_EXTENSIONS, image_extensions
from retriever.errors import UserError

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
IMAGE_COLUMN_GUESSES = ("image", "image_path", "path", "filepath", "file", "filename", "img")
CAPTION_COLUMN_GUESSES = ("caption", "text", "captions", "title", "description")
_IMAGE_SUFFIX_CASES = sorted({e for x in IMAGE_EXTENSIONS for e in (x, x.upper())})


@dataclass(frozen=True)
class SourceItem:
    """One image of a source.

    Attributes:
        index: position in the source: the row id in shards.
        path: absolute path of the image file.
        captions: every caption known for the image (training samples one per epoch).
        metadata: extra per-item columns that shards keep beside the vectors.
    """

    index: int  # position in the source: the row id in shards
    path: str  # absolute path of the image file
    captions: tuple[str, ...] = ()  # every caption known for the image (training samples one)
    # Extra per-item columns (manifest columns, sidecar JSON, file facts) that shards keep beside the vectors.
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def caption(self) -> str | None:
        return self.captions[0] if self.captions else None


class SourceList(list):
    """Items, plus what reading left out, so that every entry ends embedded or accounted for.

    Attributes:
        skipped: {"path", "reason"} per entry left out (the format of _errors.jsonl): a bad tar or
            member, a caption that is not honest text, a manifest row that is not an object, a
            vector image, a broken link.
        not_images: files a folder walk saw that are not an image type (caption .txt files apart).
    """

    def __init__(self, items=(), skipped: list[dict] | None = None, not_images: int = 0):
        super().__init__(items)
        self.skipped: list[dict] = skipped if skipped is not None else []
        self.not_images = not_images


# Folders that hold no samples: NAS thumbnails (Synology @eaDir), macOS resource forks, VCS data.
SKIPPED_FOLDERS = frozenset({"@eaDir", "__MACOSX", "#recycle", "$RECYCLE.BIN", "Thumbs.db"})


def is_hidden(rel_parts: tuple[str, ...]) -> bool:
    """Hidden files and folders (.DS_Store, ._x.jpg, .git) and NAS/OS metadata folders are not samples."""
    return any(part.startswith(".") or part in SKIPPED_FOLDERS for part in rel_parts)


def read_source(
    source: str | Path,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> Sequence[SourceItem]:
    """Read a folder (recursive), a manifest, webdataset tar shards or image Parquet into ordered items.

    Args:
        source: a folder (every image below it; a same-name .txt file is its caption); a
            CSV/TSV/JSONL/Parquet manifest with one row per image–caption pair (rows naming one
            image merge their captions); webdataset tar shards (a .tar, a glob, a brace expansion
            `shards/{00000..00099}.tar` or a folder of tars); or image Parquet (img2dataset binary
            columns, Hugging Face struct<bytes, path> cells).
        image_column, caption_column: the manifest's columns; guessed from common names when None.

    Returns:
        `SourceItem`s in a stable order; `item.index` is the row id shards and indexes use. The
        sequence's `skipped` lists the entries left out ({"path", "reason"}: a bad tar or member,
        a caption that is not text, a vector image, ...) and `not_images` counts a folder's other
        files; embed writes the first to `_errors.jsonl` and prints the count.
    """
    from retriever.data.formats import read_container_source

    contained = read_container_source(source, image_column=image_column, caption_column=caption_column)
    if contained is not None:
        return contained
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"Source {path} does not exist.")
    items: Sequence[SourceItem]
    if path.is_dir():
        items = read_folder(path)
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        items = read_source_manifest(path, image_column=image_column, caption_column=caption_column)
    else:
        raise UserError(f"Source {path} is neither a folder nor a manifest ({', '.join(sorted(MANIFEST_SUFFIXES))}).")
    if not items:
        left_out = getattr(items, "skipped", [])
        why = (
            f"; {len(left_out)} entries were left out, the first {left_out[0]['path']}: {left_out[0]['reason']}"
            if left_out
            else ""
        )
        raise UserError(f"Source {path} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}){why}.")
    return items


def read_folder(root: Path) -> SourceList:
    """Every image below `root`, sorted by relative path; captions from same-name `.txt` files.

    Every file the walk sees is accounted for in the result: images whose caption file cannot be
    read as text, vector images and broken or looping links are `skipped` with a reason; other
    files (captions apart) are counted in `not_images`.
    """
    items = SourceList()
    root = root.resolve()
    exts = image_extensions()
    files = []
    for p in sorted(root.rglob("*"), key=lambda p: p.relative_to(root).as_posix()):
        if is_hidden(p.relative_to(root).parts):
            continue
        suffix = p.suffix.lower()
        if p.is_symlink() and not p.exists():
            items.skipped.append({"path": str(p), "reason": "broken or looping symbolic link"})
        elif p.is_dir():
            continue
        elif suffix in exts:
            files.append(p)
        elif suffix in VECTOR_EXTENSIONS:
            items.skipped.append({"path": str(p), "reason": f"{suffix[1:].upper()} vector images are not supported"})
        elif not (suffix == ".txt" and any(p.with_suffix(e).exists() for e in _IMAGE_SUFFIX_CASES)):
            items.not_images += 1
    for p in files:
        txt = p.with_suffix(".txt")
        caption = None
        if txt.exists():
            try:
                caption = _clean(decode_caption(txt.read_bytes()))
            except (OSError, ValueError) as e:
                items.skipped.append({"path": str(p), "reason": f"caption file {txt.name}: {e}"})
                continue
        items.append(SourceItem(len(items), str(p), (caption,) if caption else (), file_facts(root, p)))
    return items


def decode_caption(data: bytes) -> str:
    """Caption bytes as text: UTF-8 (a byte-order mark is dropped) or UTF-16 with its BOM.

    Raises ValueError, with the reason, for anything else: guessing a legacy code page would
    store mojibake as silently as U+FFFD did.
    """
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        text = data.decode("utf-16")
    else:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None
    if "\x00" in text:
        raise ValueError("binary data, not text (it holds NUL characters)")
    return text


def file_facts(root: Path, p: Path) -> dict[str, Any]:
    """The metadata columns of a folder's image: its folder relative to the root ("" at the top),
    size in bytes and modification time (UTC)."""
    st = p.stat()
    rel = p.relative_to(root).parent.as_posix()
    return {
        "dir": "" if rel == "." else rel,
        "bytes": st.st_size,
        "mtime": _dt.datetime.fromtimestamp(st.st_mtime, _dt.timezone.utc).replace(microsecond=0),
    }


def read_source_manifest(
    path: Path, *, image_column: str | None = None, caption_column: str | None = None
) -> Sequence[SourceItem]:
    """Rows of a manifest; rows naming the same image merge, keeping every caption in order.

    CSV/TSV/Parquet stream into Arrow columns (manifests.py); JSONL is read line by line. Rows
    whose caption is not text (a struct, a number, bytes that are not UTF-8) and JSONL lines that
    are not objects are left out and listed in the result's `skipped`.
    """
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    if kind != "jsonl":
        from retriever.data.manifests import read_manifest_streaming

        return read_manifest_streaming(
            path,
            kind,
            lambda cols, wanted: _pick_column(cols, wanted, IMAGE_COLUMN_GUESSES, "image", path),
            lambda cols, wanted: _pick_column(cols, wanted, CAPTION_COLUMN_GUESSES, "caption", path, required=False),
            image_column,
            caption_column,
        )
    out = SourceList()
    rows = []
    for n, row in enumerate(_read_rows(path), 1):
        if isinstance(row, dict):
            rows.append(row)
        else:
            reason = str(row) if isinstance(row, _BadRow) else f"row {n} is a {type(row).__name__}, not an object"
            out.skipped.append({"path": f"{path}:{n}", "reason": reason})
    if not rows:
        return out
    columns = list(rows[0].keys())
    img_col = _pick_column(columns, image_column, IMAGE_COLUMN_GUESSES, "image", path)
    assert img_col is not None  # required=True raises instead of returning None
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMN_GUESSES, "caption", path, required=False)
    base = path.resolve().parent
    by_path: dict[str, list[str]] = {}
    meta: dict[str, dict[str, Any]] = {}
    extra = [c for c in columns if c not in (img_col, cap_col)]
    for row in rows:
        raw = row.get(img_col)
        if raw is None or str(raw).strip() == "":
            continue
        p = Path(str(raw).strip()).expanduser()
        key = str(p if p.is_absolute() else (base / p).resolve())
        try:
            captions = _captions_of(row.get(cap_col) if cap_col else None)
        except ValueError as e:
            out.skipped.append({"path": key, "reason": f"caption: {e}"})
            continue
        meta.setdefault(key, {c: row.get(c) for c in extra})  # rows naming one image: the first row's values
        caps = by_path.setdefault(key, [])
        for c in captions:
            if c not in caps:
                caps.append(c)
    out.extend(SourceItem(i, p, tuple(c), meta[p]) for i, (p, c) in enumerate(by_path.items()))
    return out


def _read_rows(path: Path) -> list[dict[str, Any]]:
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        with open(path, newline="", encoding="utf-8") as f:
            if kind == "jsonl":
                return [_json_line(line, n, path) for n, line in enumerate(f, 1) if line.strip()]
            return list(csv.DictReader(f, delimiter="\t" if kind == "tsv" else ","))
    except (OSError, ValueError) as e:
        raise UserError(f"Could not read manifest {path}: {e}") from e


class _BadRow(str):
    """A manifest row that could not be parsed; its text is the reason (reported, not fatal)."""


def _json_line(line: str, n: int, path: Path) -> Any:
    try:
        return json.loads(line)
    except ValueError as e:
        return _BadRow(f"line {n} is not JSON ({e})")


def _pick_column(columns, wanted, guesses, what, path, required=True) -> str | None:
    if wanted:
        if wanted not in columns:
            raise UserError(f"Manifest {path} has no column {wanted!r}; its columns are {', '.join(columns)}.")
        return wanted
    for guess in guesses:
        if guess in columns:
            return guess
    if required:
        raise UserError(
            f"Manifest {path} has no {what} column (looked for {', '.join(guesses)}); "
            f"name it with --{what}-column, one of: {', '.join(columns)}."
        )
    return None


def _captions_of(value: Any) -> list[str]:
    """Captions from a manifest cell: text, UTF-8 bytes, or a list of those.

    Anything else (a struct, a number) raises ValueError: str() of it would store a Python repr
    such as "{'a': 1}" or "b'plain'" as if it were a caption.
    """
    if value is None or (isinstance(value, float) and value != value):  # null / NaN: no caption
        return []
    if isinstance(value, (list, tuple)):
        return [c for v in value if v is not None for c in _captions_of(v)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = decode_caption(bytes(value))
    if not isinstance(value, str):
        raise ValueError(f"a {type(value).__name__} ({str(value)[:40]!r}), not text")
    c = _clean(value)
    return [c] if c else []


def _clean(text: str) -> str:
    return " ".join(text.split())
