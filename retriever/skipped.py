"""Images a job skipped because they could not be decoded: one type and one on-disk format for
embed, eval, train and the feature cache.

On disk a job with an output folder lists them in `FOLDER/_errors.jsonl`, one JSON object per line
with at least `path` and `reason` (embed adds `id` and `shard`). In results, `SkippedImages` holds
the count, the entries and that file's path; the CLI prints the count and where the list is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from retriever.atomic import write_bytes_atomic

ERRORS_FILE = "_errors.jsonl"  # `_` keeps Parquet readers of a shard folder off it


@dataclass
class SkippedImages:
    """The images a job skipped.

    Attributes:
        entries: one dict per skipped image, with at least "path" and "reason".
        file: the `_errors.jsonl` that lists every one, when the job wrote one (else None).
    """

    entries: list[dict[str, Any]] = field(default_factory=list)
    file: str | None = None

    @property
    def count(self) -> int:
        return len(self.entries)

    def __bool__(self) -> bool:
        return bool(self.entries)

    def summary(self) -> str:
        """One line: how many, and where the list is (or the first one when there is no file)."""
        if not self.entries:
            return "No image was skipped."
        where = (
            f"the list is in {self.file}"
            if self.file
            else f"e.g. {self.entries[0]['path']}: {self.entries[0]['reason']}"
        )
        return f"Skipped {self.count} unreadable image(s); {where}"

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "file": self.file, "entries": self.entries}


def skipped_entry(path: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {**extra, "path": path, "reason": reason}


def read_skipped(folder: str | Path, name: str = ERRORS_FILE) -> list[dict[str, Any]]:
    """The entries of `folder/_errors.jsonl` (none when it does not exist); `name`: another file
    of the folder, e.g. a part's `_errors-pIofN.jsonl`."""
    path = Path(folder) / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_skipped(folder: str | Path, entries: Iterable[dict[str, Any]], name: str = ERRORS_FILE) -> SkippedImages:
    """Atomically (re)write `folder/_errors.jsonl` (or `folder/name`) with `entries` (no file when
    there are none)."""
    entries = list(entries)
    path = Path(folder) / name
    if entries:
        write_bytes_atomic(path, "".join(json.dumps(e) + "\n" for e in entries).encode())
    return SkippedImages(entries, str(path) if entries else None)
