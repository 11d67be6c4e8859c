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

from retriever.data.images import IMAGE_EXTENSIONS, image_extensions
from retriever.errors import UserError

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
IMAGE_COLUMN_GUESSES = ("image", "image_path", "path", "filepath", "file", "filename", "img")
CAPTION_COLUMN_GUESSES = ("caption", "text", "captions", "title", "description")


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
    """Items, plus what reading skipped: `skipped` lists {"path", "reason"} (the format of _errors.jsonl) per bad tar/member/file."""

    skipped: list[dict] = []


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
        `SourceItem`s in a stable order; `item.index` is the row id shards and indexes use. For tar
        and image-Parquet sources a `SourceList` whose `skipped` lists bad tars/members.
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
        raise UserError(f"Source {path} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return items


def read_folder(root: Path) -> list[SourceItem]:
    """Every image below `root`, sorted by relative path; captions from same-name `.txt` files."""
    root = root.resolve()
    exts = image_extensions()
    files = sorted(
        (
            p
            for p in root.rglob("*")
            if p.suffix.lower() in exts and not is_hidden(p.relative_to(root).parts) and p.is_file()
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    items = []
    for i, p in enumerate(files):
        txt = p.with_suffix(".txt")
        caption = _clean(txt.read_text(encoding="utf-8", errors="replace")) if txt.is_file() else None
        items.append(SourceItem(i, str(p), (caption,) if caption else (), file_facts(root, p)))
    return items


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

    CSV/TSV/Parquet stream into Arrow columns (manifests.py); JSONL is read line by line.
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
    rows = _read_rows(path)
    if not rows:
        return []
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
        caps = by_path.setdefault(key, [])
        meta.setdefault(key, {c: row.get(c) for c in extra})  # rows naming one image: the first row's values
        for c in _captions_of(row.get(cap_col) if cap_col else None):
            if c not in caps:
                caps.append(c)
    return [SourceItem(i, p, tuple(c), meta[p]) for i, (p, c) in enumerate(by_path.items())]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    try:
        if kind == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        with open(path, newline="", encoding="utf-8") as f:
            if kind == "jsonl":
                return [json.loads(line) for line in f if line.strip()]
            return list(csv.DictReader(f, delimiter="\t" if kind == "tsv" else ","))
    except (OSError, ValueError) as e:
        raise UserError(f"Could not read manifest {path}: {e}") from e


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
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [c for c in (_clean(str(v)) for v in value if v is not None) if c]
    c = _clean(str(value))
    return [c] if c else []


def _clean(text: str) -> str:
    return " ".join(text.split())
