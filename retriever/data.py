"""Where image–caption pairs come from: a folder of images, or a manifest file.

A source is a list of `SourceItem`s in a deterministic order. The position in that order becomes
the row's `id`, which is what makes ids stable when an interrupted `embed` resumes.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image

from .errors import UserError
from .images import IMAGE_EXTENSIONS, load_image

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
IMAGE_COLUMN_GUESSES = ("image", "image_path", "path", "filepath", "file", "filename", "img")
CAPTION_COLUMN_GUESSES = ("caption", "text", "captions", "title", "description")


@dataclass(frozen=True)
class SourceItem:
    index: int  # position in the source: the row id in shards
    path: str  # absolute path of the image file
    captions: tuple[str, ...] = ()  # every caption known for the image (training samples one)

    @property
    def caption(self) -> str | None:
        return self.captions[0] if self.captions else None


def read_source(
    source: str | Path,
    *,
    image_column: str | None = None,
    caption_column: str | None = None,
) -> list[SourceItem]:
    """Read a folder (recursive) or a CSV/TSV/JSONL/Parquet manifest into ordered items."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"Source {path} does not exist.")
    if path.is_dir():
        items = read_folder(path)
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        items = read_manifest(path, image_column=image_column, caption_column=caption_column)
    else:
        raise UserError(
            f"Source {path} is neither a folder nor a manifest ({', '.join(sorted(MANIFEST_SUFFIXES))})."
        )
    if not items:
        raise UserError(f"Source {path} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return items


def read_folder(root: Path) -> list[SourceItem]:
    """Every image below `root`, sorted by relative path; captions from same-name `.txt` files."""
    root = root.resolve()
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    items = []
    for i, p in enumerate(files):
        txt = p.with_suffix(".txt")
        caption = _clean(txt.read_text(encoding="utf-8", errors="replace")) if txt.is_file() else None
        items.append(SourceItem(i, str(p), (caption,) if caption else ()))
    return items


def read_manifest(
    path: Path, *, image_column: str | None = None, caption_column: str | None = None
) -> list[SourceItem]:
    """Rows of a manifest; rows naming the same image merge, keeping every caption in order."""
    rows = _read_rows(path)
    if not rows:
        return []
    columns = list(rows[0].keys())
    img_col = _pick_column(columns, image_column, IMAGE_COLUMN_GUESSES, "image", path)
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMN_GUESSES, "caption", path, required=False)
    base = path.resolve().parent
    by_path: dict[str, list[str]] = {}
    for row in rows:
        raw = row.get(img_col)
        if raw is None or str(raw).strip() == "":
            continue
        p = Path(str(raw).strip()).expanduser()
        key = str(p if p.is_absolute() else (base / p).resolve())
        caps = by_path.setdefault(key, [])
        for c in _captions_of(row.get(cap_col) if cap_col else None):
            if c not in caps:
                caps.append(c)
    return [SourceItem(i, p, tuple(c)) for i, (p, c) in enumerate(by_path.items())]


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


def default_workers() -> int:
    """Image-decoding worker processes that help rather than hurt.

    On a CPU-only machine every worker competes with torch's intra-op threads for the same cores:
    on 2 cores, RN50 embedding ran at 0.82x the bare forward with 2 workers and 0.91x with none
    (benchmarks/RESULTS.md). So leave two cores to torch there; with a GPU, decoding is all the
    CPU has to do.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        return min(8, cpus)
    return max(0, min(4, cpus - 2))


@dataclass
class DecodedBatch:
    indices: list[int]  # positions (into the dataset's items) that decoded
    pixels: torch.Tensor | None  # (len(indices), 3, H, W)
    errors: list[tuple[int, str]]  # (position, reason) for those that did not


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers, turning failures into records."""

    def __init__(self, paths: Sequence[str], preprocess: Callable[[Image.Image], torch.Tensor]):
        self.paths = list(paths)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.paths[i])), None
        except Exception as e:  # any decoder failure is data, not a crash (bombs, truncation, junk)
            return i, None, f"{type(e).__name__}: {e}"


def collate_decoded(samples) -> DecodedBatch:
    good = [(i, t) for i, t, err in samples if err is None]
    errors = [(i, err) for i, _, err in samples if err is not None]
    pixels = torch.stack([t for _, t in good]) if good else None
    return DecodedBatch([i for i, _ in good], pixels, errors)
