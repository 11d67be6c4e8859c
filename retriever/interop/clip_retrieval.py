"""clip-retrieval inference folders ⇄ retriever shards, without re-embedding.

clip-retrieval writes, for each output partition N (row-aligned):

    img_emb/img_emb_N.npy        (n, d) float16, L2-normalised image embeddings
    text_emb/text_emb_N.npy      (n, d) float16, text embeddings (when captions were embedded)
    metadata/metadata_N.parquet  n rows: image_path, caption (, url, ...)

The folder does not record which model made the vectors, so import takes it from the user
(`--model/--pretrained`) and checks only what it can: the dimension. Every file is checked before
anything is written, so a misaligned folder is refused whole. Export writes the same layout from
shards (float16, zero rows in text_emb where a row has no caption, `id` kept as a metadata column
so a round trip keeps ids).

Both write their --out as a whole (atomic_dir: a killed run leaves only a hidden temp folder, which
the next run removes) under the folder's writer lock (locks.py), and replace an existing --out only
when it is a folder of the kind they write: import a shard folder (with `overwrite`), export a
clip-retrieval folder. Anything else (a file, a folder of photos) is refused in one sentence.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from retriever.atomic import atomic_dir, atomic_path, clean_stale_siblings
from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.locks import folder_lock
from retriever.shards import (
    SHARD_GLOB,
    ShardSet,
    check_shard_folder,
    fixed_list_to_numpy,
    shard_name,
    shard_schema,
    write_shard,
)

_NUM = re.compile(r"_(\d+)\.(npy|parquet)$")
LAYOUT = {
    "img_emb": re.compile(r"^img_emb_\d+\.npy$"),
    "text_emb": re.compile(r"^text_emb_\d+\.npy$"),
    "metadata": re.compile(r"^metadata_\d+\.parquet$"),
}
PATH_COLUMNS = ("image_path", "path", "url")


@dataclass(frozen=True)
class Partition:
    number: int
    img: Path
    text: Path | None
    metadata: Path
    rows: int


def _numbered(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    out = {}
    for p in folder.glob(f"{prefix}_*{suffix}") if folder.is_dir() else []:
        m = _NUM.search(p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def _npy_shape(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable .npy file: {e}") from e
    return arr.shape, arr.dtype


def scan_clip_retrieval(folder: str | Path, embed_dim: int) -> list[Partition]:
    """Check a clip-retrieval folder whole: files paired, row counts aligned, dimension `embed_dim`."""
    root = Path(folder).expanduser()
    imgs = _numbered(root / "img_emb", "img_emb", ".npy")
    texts = _numbered(root / "text_emb", "text_emb", ".npy")
    metas = _numbered(root / "metadata", "metadata", ".parquet")
    if not imgs:
        raise UserError(f"{root} is not a clip-retrieval output folder (no img_emb/img_emb_N.npy).")
    parts = []
    for n in sorted(imgs):
        if n not in metas:
            raise UserError(f"{imgs[n]} has no matching metadata/metadata_{n}.parquet.")
        shape, _ = _npy_shape(imgs[n])
        if len(shape) != 2 or shape[1] != embed_dim:
            raise UserError(
                f"{imgs[n]} holds vectors of shape {shape}, but the model has dimension {embed_dim}; "
                "name the model that made them with --model/--pretrained."
            )
        rows = pq.ParquetFile(metas[n]).metadata.num_rows
        if rows != shape[0]:
            raise UserError(f"{imgs[n]} has {shape[0]} rows but {metas[n].name} has {rows}; they must be row-aligned.")
        text = texts.get(n)
        if text is not None:
            tshape, _ = _npy_shape(text)
            if tshape != shape:
                raise UserError(f"{text} has shape {tshape} but {imgs[n].name} has {shape}; they must be row-aligned.")
        parts.append(Partition(n, imgs[n], text, metas[n], rows))
    return parts


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def import_clip_retrieval(
    folder: str | Path,
    out_dir: str | Path,
    identity: ModelIdentity,
    dtype: str = "float32",
    encode_texts: Callable[[list[str]], np.ndarray] | None = None,
    *,
    overwrite: bool = False,
    wait: bool = False,
    on_message: Callable[[str], None] | None = None,
) -> dict:
    """Turn a clip-retrieval folder into shards in `out_dir` (one shard per partition), written whole.

    identity: the model that made the vectors (the folder does not say; only the dimension is checked).
    encode_texts: where a partition has captions but no text_emb file, embeds them with the same
        model (shards keep a text vector for every caption); without it such captions are dropped.
    overwrite: replace an --out that already holds shards (never anything but a shard folder).
    wait: if another retriever process is writing `out_dir`, wait for it instead of refusing.
    on_message: called with a sentence when waiting, and for each leftover of a killed run removed.
    """
    parts = scan_clip_retrieval(folder, identity.embed_dim)
    out = Path(out_dir).expanduser()
    check_import_out(out, overwrite)
    with _writer_locks(out, wait, on_message, "importing into", inside_too=True):
        check_import_out(out, overwrite)  # again: the folder may have changed while we waited
        with atomic_dir(out) as tmp:
            return {**_import_into(parts, tmp, identity, dtype, encode_texts), "out_dir": str(out)}


def check_import_out(out: Path, overwrite: bool) -> None:
    """Refuse an import --out that is not absent, an empty folder or a shard folder (one holding
    shards only with `overwrite`)."""
    check_shard_folder(out)
    if not overwrite and out.is_dir() and any(out.glob(SHARD_GLOB)):
        raise UserError(f"--out {out} already holds shards; pass --overwrite to replace them, or choose a new folder.")


@contextlib.contextmanager
def _writer_locks(
    out: Path, wait: bool, on_message: Callable[[str], None] | None, what: str, inside_too: bool = False
) -> Iterator[None]:
    """The lock of a folder replaced as a whole (beside it), and, for a shard folder that exists, the
    lock `embed` takes inside it, so an import never swaps a folder an embed is writing; then the
    leftovers of killed writers are removed (safe only under the lock)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(folder_lock(out, inside=False, wait=wait, on_wait=on_message, what=what))
        if inside_too and out.is_dir():
            stack.enter_context(folder_lock(out, inside=True, wait=wait, on_wait=on_message, what=what))
        for line in clean_stale_siblings(out):
            if on_message:
                on_message(line)
        yield


def _import_into(
    parts: list[Partition],
    out: Path,
    identity: ModelIdentity,
    dtype: str,
    encode_texts: Callable[[list[str]], np.ndarray] | None,
) -> dict:
    schema = shard_schema(identity, dtype)
    next_id = 0
    rows = text_rows = 0
    for k, part in enumerate(parts):
        meta = pq.read_table(part.metadata)
        names = meta.column_names
        path_col = next((c for c in PATH_COLUMNS if c in names), None)
        n = part.rows
        ids = meta.column("id").to_pylist() if "id" in names else list(range(next_id, next_id + n))
        next_id = max(next_id + n, (max(ids) + 1) if ids else next_id)
        paths = [str(p) if p is not None else "" for p in meta.column(path_col).to_pylist()] if path_col else [""] * n
        captions = meta.column("caption").to_pylist() if "caption" in names else [None] * n
        captions = [c if c is None or str(c).strip() else None for c in captions]
        img = _normalised(np.load(part.img, allow_pickle=False))
        has_text = np.array([c is not None for c in captions], bool)
        if part.text is not None:
            txt = _normalised(np.load(part.text, allow_pickle=False))
        else:
            txt = np.zeros_like(img)
            if encode_texts is not None and has_text.any():
                txt[has_text] = _normalised(encode_texts([c for c in captions if c is not None]))
            else:  # a caption without a text vector would break the shard's caption ⇔ text vector rule
                captions = [None] * n
                has_text[:] = False
        write_shard(out / shard_name(k), schema, ids, paths, captions, img, txt, has_text)
        rows += n
        text_rows += int(has_text.sum())
    return {"shards": len(parts), "rows": rows, "rows_with_text": text_rows}


def check_clip_retrieval_out(out: Path, shards: Path | None = None) -> None:
    """Refuse to replace `out` unless it is absent, an empty folder, or a clip-retrieval folder
    (img_emb/, text_emb/, metadata/ holding only their numbered files); never the shard folder."""
    if shards is not None and out.exists():
        a, b = out.resolve(), Path(shards).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise UserError(f"--out {out} overlaps the shard folder {shards}; export to a folder of its own.")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(
            f"--out {out} is a file, not a clip-retrieval folder; refusing to replace it, choose a new folder."
        )
    strangers = [
        f"{p.name}/{q.name}" if p.name in LAYOUT else p.name
        for p in sorted(out.iterdir())
        for q in (sorted(p.iterdir()) if p.name in LAYOUT and p.is_dir() else [p])
        if not (p.name in LAYOUT and p.is_dir() and q.is_file() and LAYOUT[p.name].match(q.name))
    ]
    if strangers:
        raise UserError(
            f"--out {out} is not a clip-retrieval folder (it holds {', '.join(strangers[:3])}); "
            "refusing to replace it, choose a new or empty folder."
        )


def export_clip_retrieval(
    shards: str | Path,
    out_dir: str | Path,
    *,
    wait: bool = False,
    on_message: Callable[[str], None] | None = None,
) -> dict:
    """Write shards as a clip-retrieval folder, replacing `out_dir` as a whole.

    out_dir: absent, empty, or an earlier export (anything else is refused).
    wait: if another retriever process is writing `out_dir`, wait for it instead of refusing.
    on_message: called with a sentence when waiting, and for each leftover of a killed run removed.
    """
    ss = ShardSet(shards)
    out = Path(out_dir).expanduser()
    check_clip_retrieval_out(out, ss.folder)
    with _writer_locks(out, wait, on_message, "exporting to"):
        check_clip_retrieval_out(out, ss.folder)
        return _export_locked(ss, out)


def _export_locked(ss: ShardSet, out: Path) -> dict:
    rows = 0
    with atomic_dir(out) as tmp:
        for sub in ("img_emb", "text_emb", "metadata"):
            (tmp / sub).mkdir()
        for k, shard in enumerate(ss.shards):
            table = pq.read_table(shard.path, columns=["id", "path", "caption", "image_embedding", "text_embedding"])
            img = fixed_list_to_numpy(table.column("image_embedding"))
            txt_col = table.column("text_embedding").combine_chunks()
            txt = np.zeros_like(img)
            valid = np.asarray(txt_col.is_valid(), bool)
            if valid.any():
                txt[valid] = fixed_list_to_numpy(txt_col.filter(txt_col.is_valid()))
            _save_npy(tmp / "img_emb" / f"img_emb_{k}.npy", img.astype(np.float16))
            _save_npy(tmp / "text_emb" / f"text_emb_{k}.npy", txt.astype(np.float16))
            meta = pa.table(
                {"image_path": table.column("path"), "caption": table.column("caption"), "id": table.column("id")}
            )
            pq.write_table(meta, tmp / "metadata" / f"metadata_{k}.parquet")
            rows += len(table)
    return {"out_dir": str(out), "partitions": len(ss.shards), "rows": rows, "model": ss.meta["model"]}


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)
