"""Atomic writes: a reader sees either the old file or the complete new one, never half of one."""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path; on success it is renamed over `path`.

    The temp name starts with a dot so that Parquet readers (pyarrow, pandas, duckdb globs on
    `*.parquet`) never pick up a half-written file while a job runs or after it is killed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path` as a whole.

    Replacing a folder takes two renames (old away, new in); the window between them is tiny and a
    crash there leaves the old folder recoverable under its `.old` name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkdtemp: its 0700 would make every index and model folder private whatever the umask
    # (a search service under another account could not read them). mkdir applies the umask.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_siblings(path: str | os.PathLike) -> list[str]:
    """Remove what killed writers of `path` left beside it; returns one line per thing done.

    Only call this while holding the folder's lock (retriever.locks): then every `.NAME.XXXX.tmp`
    (a half-built folder or file) and `.NAME.XXXX.old` (a replaced folder not yet deleted) belongs
    to a dead process. A crash between atomic_dir's two renames leaves no `path` and an `.old`:
    that old folder is put back rather than deleted.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.[0-9a-z_]+\.(tmp|old)$")
    found = sorted(p for p in path.parent.iterdir() if pattern.match(p.name))
    done = []
    olds = [p for p in found if p.name.endswith(".old")]
    if not path.exists() and len(olds) == 1:
        os.replace(olds[0], path)
        done.append(f"restored {path} from {olds[0].name} (a writer died while swapping it)")
        found.remove(olds[0])
    for p in found:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(f"removed {p.name} left by a killed writer")
    return done


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.[0-9a-z_]{8}\.(tmp|old)$")


def clean_stale_in(folder: str | os.PathLike) -> list[str]:
    """clean_stale_siblings for every target whose leftovers lie directly in `folder` (under its lock)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    targets = sorted({m["name"] for p in folder.iterdir() if (m := _LEFTOVER.match(p.name))})
    return [line for name in targets for line in clean_stale_siblings(folder / name)]


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
