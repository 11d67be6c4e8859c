"""webdataset tar shards as img2dataset writes them, read member by member with the stdlib.

A shard `00000.tar` holds groups of members sharing a key: `{key}.jpg|png|webp|…` (the image),
`{key}.txt` (the caption) and `{key}.json` (metadata). Reading walks the tar headers in order
(tarfile seeks over the image bytes, nothing is extracted) and makes one item per key, located at
`TAR#key`. The image members' byte ranges go into a member offset table `{tar}.idx.json` written
beside the shard (when the folder is writable), so the image of any item can later be read with
one seek, by a DataLoader worker, a search result or the server; without the table the tar's
headers are scanned again (once per process).

Problems are per item or per tar, never fatal: a tar that is not a tar or is truncated, a key with
no image member, a key that appears twice in one tar, a caption that is not honest text: each is
skipped and reported. Captions follow the rule of every other source (sources.decode_caption): a
`.txt` member is UTF-8 (a BOM dropped) or BOM-marked UTF-16; a `.json` sidecar must be such text
holding a JSON object whose `caption`, if present, is text. Anything else would be stored as
U+FFFD or a Python repr, so the item is left out with the reason.

The `webdataset` package is not used: its value is streaming from URLs and shuffling buffers for
training; reading local shards in order needs nothing beyond `tarfile`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from retriever.data.locations import tar_location
from retriever.data.sources import _captions_of, decode_caption

OFFSETS_SUFFIX = ".idx.json"
_KEY_RE = re.compile(r"^((?:.*/)?[^./][^/]*?)\.([^/]*)$")  # webdataset: key = name up to the first dot of the basename
_BRACE_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_BRACE_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


@dataclass
class TarMember:
    """One key of a shard: where its image bytes are and what came with it."""

    key: str
    image: str | None = None  # member name of the image
    offset: int = 0  # byte offset of the image data in the tar
    size: int = 0
    caption: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    others: list[str] = field(default_factory=list)  # every member name of the key
    problem: str | None = None  # why the item cannot be used as it is (its caption member is not text)
    json_caption: str | None = None  # the .json sidecar's caption, used when there is no .txt member
    json_caption_problem: str | None = None  # why that caption is not text (matters only without a .txt)


def expand_braces(spec: str) -> list[str]:
    """`a/{00000..00002}.tar` → three names (zero padding kept); `{a,b}` lists too; nested allowed."""
    found = [m for m in (_BRACE_RANGE.search(spec), _BRACE_LIST.search(spec)) if m]
    if not found:
        return [spec]
    m = min(found, key=lambda x: x.start())  # leftmost first, as the shell expands
    head, tail = spec[: m.start()], spec[m.end() :]
    if m.re is _BRACE_RANGE:
        lo, hi = m.group(1), m.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        step = 1 if int(hi) >= int(lo) else -1
        choices = [str(n).zfill(width) for n in range(int(lo), int(hi) + step, step)]
    else:
        choices = m.group(1).split(",")
    return [x for c in choices for x in expand_braces(head + c + tail)]


def looks_like_tar_spec(spec: str) -> bool:
    """A source string naming tar shards: a .tar path, a glob of them or a brace expansion."""
    return spec.lower().endswith(".tar") or (bool(set("*?[{") & set(spec)) and ".tar" in spec.lower())


def tar_paths(spec: str | os.PathLike, suffix: str = ".tar") -> list[Path]:
    """The files a source names: one file, a folder of them (not recursive), a glob or a brace
    expansion (`shards/{00000..00099}.tar`, `{a,b}.tar`), in order.

    Names that match nothing are returned as they are, so the reader reports them as missing.
    """
    text = os.path.expanduser(os.fspath(spec))
    p = Path(text)
    if p.is_dir():
        return sorted(q for q in p.iterdir() if q.suffix.lower() == suffix and not q.name.startswith("."))
    out: list[Path] = []
    for name in expand_braces(text):
        if glob.has_magic(name):
            out.extend(Path(x) for x in sorted(glob.glob(name)))
        else:
            out.append(Path(name))
    return out


def scan_tar(path: Path) -> tuple[list[TarMember], list[dict[str, str]]]:
    """Walk one shard's headers in order: its keys (with image byte ranges) and its problems.

    Opened in seekable mode ("r:"): tarfile reads each header and seeks over the member data, so a
    shard of 10k images costs 10k small reads, not a read of every image.
    """
    members: list[TarMember] = []
    problems: list[dict[str, str]] = []
    where = str(path)
    try:
        size = path.stat().st_size
        tf = tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as e:
        return [], [{"path": where, "reason": f"not a readable tar ({type(e).__name__}: {e})"}]
    seen: set[str] = set()
    current: TarMember | None = None

    def finish(m: TarMember | None) -> None:
        if m is None:
            return
        loc = tar_location(path, m.key)
        if m.key in seen:
            problems.append({"path": loc, "reason": f"duplicated key {m.key!r} in {path.name}; kept the first"})
        elif m.image is None:
            problems.append({"path": loc, "reason": f"no image member (found {', '.join(m.others)})"})
        elif m.problem is not None:
            problems.append({"path": loc, "reason": m.problem})
        elif m.caption is None and m.json_caption_problem is not None:
            problems.append({"path": loc, "reason": m.json_caption_problem})
        else:
            if m.caption is None:
                m.caption = m.json_caption
            members.append(m)
        seen.add(m.key)

    with tf:
        try:
            for info in tf:
                if not info.isfile():
                    continue
                match = _KEY_RE.match(info.name)
                if not match or any(part.startswith(".") for part in info.name.split("/")):
                    continue  # hidden files (._AppleDouble, .DS_Store) are not samples
                key, ext = match.group(1), match.group(2).lower()
                if info.offset_data + info.size > size:
                    problems.append(
                        {"path": tar_location(path, key), "reason": f"truncated tar: {info.name} is cut short"}
                    )
                    break
                if current is None or current.key != key:
                    finish(current)
                    current = TarMember(key)
                current.others.append(info.name)
                _take_member(tf, info, ext, current)
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append({"path": where, "reason": f"truncated or corrupt tar ({type(e).__name__}: {e})"})
            current = None  # its members may be cut short
        finish(current)
    _write_offsets(path, members)
    return members, problems


def _take_member(tf: tarfile.TarFile, info: tarfile.TarInfo, ext: str, m: TarMember) -> None:
    from retriever.data.images import image_extensions

    if "." + ext in image_extensions():
        if m.image is None:
            m.image, m.offset, m.size = info.name, info.offset_data, info.size
    elif ext in ("txt", "caption", "json"):
        f = tf.extractfile(info)
        data = f.read() if f is not None else b""
        try:
            if ext == "json":
                _take_sidecar(data, m, info.name)
            else:
                m.caption = _one_caption(decode_caption(data)) or m.caption
        except ValueError as e:
            if m.problem is None:
                m.problem = f"{'metadata' if ext == 'json' else 'caption'} member {info.name}: {e}"


def _take_sidecar(data: bytes, m: TarMember, name: str) -> None:
    """A `.json` member's fields into the item's metadata; ValueError when it is not a JSON object
    in honest text. A caption field that is not text is noted, not raised: a `.txt` member wins."""
    try:
        value = json.loads(decode_caption(data))
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    m.metadata.update(value)
    try:
        m.json_caption = _one_caption(value.get("caption"))
    except ValueError as e:
        m.json_caption_problem = f"caption in {name}: {e}"


def _one_caption(value: Any) -> str | None:
    """The first caption of a sidecar value (text, or a list of texts); ValueError for a struct or number."""
    captions = _captions_of(value)
    return captions[0] if captions else None


def _offsets_path(tar: Path) -> Path:
    return tar.with_name(tar.name + OFFSETS_SUFFIX)


def _stamp(tar: Path) -> dict[str, int]:
    st = tar.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _write_offsets(tar: Path, members: list[TarMember]) -> None:
    """The member offset table beside the shard; skipped silently where the folder is read-only."""
    from retriever.atomic import write_json_atomic

    table = {**_stamp(tar), "members": {m.key: [m.offset, m.size, m.image] for m in members}}
    try:
        write_json_atomic(_offsets_path(tar), table)
    except OSError:
        pass


@lru_cache(maxsize=64)
def _offsets(tar: str, size: int, mtime_ns: int) -> dict[str, list]:
    path = Path(tar)
    table_path = _offsets_path(path)
    if table_path.is_file():
        try:
            table = json.loads(table_path.read_text())
            if table.get("size") == size and table.get("mtime_ns") == mtime_ns:
                return table["members"]
        except (OSError, ValueError, KeyError):
            pass  # stale or damaged: rebuild from the headers
    members, _ = scan_tar(path)
    return {m.key: [m.offset, m.size, m.image] for m in members}


def read_tar_image(tar: str | Path, key: str) -> bytes:
    """The image bytes of `key` in shard `tar`, by one seek (offset table) rather than a scan."""
    path = Path(tar)
    stamp = _stamp(path)  # FileNotFoundError for a vanished shard: reported per item
    table = _offsets(str(path), stamp["size"], stamp["mtime_ns"])
    if key not in table:
        raise FileNotFoundError(f"{path.name} has no image for key {key!r}")
    offset, size, _ = table[key]
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"{path.name}: image of {key!r} is cut short ({len(data)} of {size} bytes)")
    return data


def read_webdataset(spec: str | os.PathLike) -> tuple[list[tuple[str, tuple[str, ...], dict]], list[dict], int]:
    """(locations with captions and metadata, problems, number of tars) for a shard spec, in shard order."""
    rows: list[tuple[str, tuple[str, ...], dict]] = []
    problems: list[dict] = []
    paths = tar_paths(spec)
    for tar in paths:
        if not tar.is_file():
            problems.append({"path": str(tar), "reason": "no such tar shard"})
            continue
        tar = tar.resolve()
        members, bad = scan_tar(tar)
        problems.extend(bad)
        for m in members:
            meta = dict(m.metadata)
            meta.setdefault("key", m.key)
            rows.append((tar_location(tar, m.key), (m.caption,) if m.caption else (), meta))
    return rows, problems, len(paths)
