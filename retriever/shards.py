"""Parquet shards: embeddings and metadata side by side, one self-describing file per shard.

Schema (one row per image):

    id               int64, unique, = the image's position in its source (stable across resumes)
    path             string
    caption          string, null when the image has none
    image_embedding  fixed_size_list<float32|float16>[dim], L2-normalised
    text_embedding   fixed_size_list<float32|float16>[dim], null when caption is null
    …                metadata columns (SourceItem.metadata: manifest columns, folder facts,
                     sidecar fields), one Arrow type per column inferred over the collection

The schema metadata key `retriever` holds JSON: model identity, dim, dtype, normalisation and the
retriever version, so a shard folder says which model made it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from retriever import __version__
from retriever.atomic import atomic_path
from retriever.errors import UserError
from retriever.identity import ModelIdentity

METADATA_KEY = b"retriever"
SHARD_GLOB = "part-*.parquet"
_SHARD_RE = re.compile(r"^part-(\d{5,})(?:-p\d+of\d+)?\.parquet$")  # -pIofN: written by part I of N
DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
EMBEDDING_COLUMNS = {"image": "image_embedding", "text": "text_embedding"}


def shard_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


def shard_number(name: str) -> int | None:
    m = _SHARD_RE.match(name)
    return int(m.group(1)) if m else None


BASE_COLUMNS = ("id", "path", "caption", "image_embedding", "text_embedding")


# What a shard folder may hold besides its shards: ours (one-process or part-tagged job and
# errors files), or hidden (temp files, the locks, .DS_Store).
_SHARD_FOLDER_FILE = re.compile(r"^(_embed_job|_errors)(-p\d+of\d+)?\.(json|jsonl)$")


def check_shard_folder(out: str | Path) -> None:
    """Refuse an --out that is a file or a folder of something else (issue 10: never mix into user data).

    Absent, empty, or a shard folder (shards, retriever's job and errors files, hidden files) passes.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder.")
    if not out.is_dir():
        return
    strangers = sorted(
        p.name
        for p in out.iterdir()
        if not _SHARD_FOLDER_FILE.match(p.name) and not p.name.startswith(".") and shard_number(p.name) is None
    )
    if strangers:
        raise UserError(
            f"--out {out} is not a shard folder (it holds {', '.join(strangers[:3])}); choose a new or empty folder."
        )


def shard_schema(
    identity: ModelIdentity, dtype: str = "float32", metadata_fields: Sequence[pa.Field] = ()
) -> pa.Schema:
    if dtype not in DTYPES:
        raise UserError(f"Unknown embedding dtype {dtype!r}; choose float32 or float16.")
    vec = pa.list_(DTYPES[dtype], identity.embed_dim)
    meta = {
        "model": identity.to_dict(),
        "dim": identity.embed_dim,
        "dtype": dtype,
        "normalized": "l2",
        "retriever_version": __version__,
    }
    return pa.schema(
        [
            pa.field("id", pa.int64(), nullable=False),
            pa.field("path", pa.string(), nullable=False),
            pa.field("caption", pa.string()),
            pa.field("image_embedding", vec, nullable=False),
            pa.field("text_embedding", vec),
            *metadata_fields,
        ],
        metadata={METADATA_KEY: json.dumps(meta).encode()},
    )


def write_shard(
    path: Path,
    schema: pa.Schema,
    ids: Sequence[int],
    paths: Sequence[str],
    captions: Sequence[str | None],
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    text_valid: np.ndarray,
    metadata: Sequence[Mapping[str, Any]] | None = None,
) -> None:
    """Write one shard atomically. `text_valid[i]` is False where row i has no caption;
    `metadata[i]` holds row i's values for the schema's metadata columns (missing keys: null)."""
    vec_type = schema.field("image_embedding").type
    extra = [f for f in schema if f.name not in BASE_COLUMNS]
    rows_meta = metadata if metadata is not None else [{}] * len(ids)
    table = pa.Table.from_arrays(
        [
            pa.array(ids, pa.int64()),
            pa.array(paths, pa.string()),
            pa.array(captions, pa.string()),
            _fixed_list(image_embeddings, vec_type),
            _fixed_list(text_embeddings, vec_type, mask=~np.asarray(text_valid, bool)),
            *(_column([m.get(f.name) for m in rows_meta], f.type) for f in extra),
        ],
        schema=schema,
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=4096, compression="zstd")


def metadata_fields(rows: Iterable[Mapping[str, Any]]) -> list[pa.Field]:
    """One Arrow field per metadata key seen in `rows`, typed over every value of the column:
    whatever Arrow infers for JSON-able scalars (ints, floats, bools, strings, timestamps), text
    where the values are mixed or nested. Keys that clash with the shard's own columns get a
    `source_` prefix (see `metadata_key`)."""
    values: dict[str, list] = {}
    for m in rows:
        for key, v in m.items():
            values.setdefault(metadata_key(key), []).append(v)
    fields = []
    for name, vals in values.items():
        try:
            t = pa.array(vals).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            t = pa.string()
        if pa.types.is_null(t):
            t = pa.string()
        elif not (pa.types.is_primitive(t) or pa.types.is_string(t) or pa.types.is_timestamp(t)):
            t = pa.string()  # lists and structs: kept as their JSON text
        fields.append(pa.field(name, t))
    return fields


def metadata_key(key: str) -> str:
    key = str(key)
    return f"source_{key}" if key in BASE_COLUMNS else key


def _column(values: list, t: pa.DataType) -> pa.Array:
    if pa.types.is_string(t):  # mixed or nested values are kept as text
        values = [None if v is None else _text(v) for v in values]
    return pa.array(values, t)


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)


def _fixed_list(vectors: np.ndarray, vec_type: pa.DataType, mask: np.ndarray | None = None) -> pa.Array:
    dim = vec_type.list_size
    flat = np.ascontiguousarray(vectors, dtype=vec_type.value_type.to_pandas_dtype()).reshape(-1)
    arr = pa.FixedSizeListArray.from_arrays(
        pa.array(flat), dim, mask=pa.array(mask) if mask is not None and mask.any() else None
    )
    return arr


def fixed_list_to_numpy(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, dim) float32 from a fixed_size_list column without nulls."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    dim = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(arr), dim).astype(np.float32, copy=False)


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    num_rows: int
    num_text_rows: int


class ShardSet:
    """A folder of shards written by one model; reads them in streaming batches."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise UserError(f"Shard folder {self.folder} does not exist.")
        files = sorted(p for p in self.folder.glob(SHARD_GLOB) if shard_number(p.name) is not None)
        if not files:
            raise UserError(f"{self.folder} holds no shards ({SHARD_GLOB}); run `retriever embed` first.")
        self.meta: dict[str, Any] = {}
        shards = []
        for f in files:
            try:
                pf = pq.ParquetFile(f)
            except (pa.ArrowException, OSError) as e:
                raise UserError(
                    f"Shard {f} cannot be read ({type(e).__name__}: {str(e).strip()[:120]}); it is damaged, rerun "
                    "`retriever embed` with the same arguments to redo it."
                ) from None
            meta = read_shard_meta(pf.schema_arrow, f)
            if not self.meta:
                self.meta = meta
            elif meta["model"] != self.meta["model"]:
                raise UserError(
                    f"{f.name} was written by a different model than {files[0].name}; one folder, one model."
                )
            shards.append(ShardInfo(f, pf.metadata.num_rows, _count_valid(pf, "text_embedding")))
        self.shards: list[ShardInfo] = shards
        self.identity = ModelIdentity.from_dict(self.meta["model"])

    @property
    def metadata_fields(self) -> list[pa.Field]:
        """The shards' metadata columns (those beyond id, path, caption and the embeddings)."""
        schema = pq.ParquetFile(self.shards[0].path).schema_arrow
        return [f for f in schema if f.name not in BASE_COLUMNS]

    @property
    def column_names(self) -> list[str]:
        return [*BASE_COLUMNS, *(f.name for f in self.metadata_fields)]

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def num_rows(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def count(self, modality: str) -> int:
        return self.num_rows if modality == "image" else sum(s.num_text_rows for s in self.shards)

    def iter_batches(
        self, columns: Sequence[str], batch_size: int = 16384
    ) -> Iterator[tuple[ShardInfo, pa.RecordBatch]]:
        """Stream record batches shard by shard, holding about one batch in memory.

        pre_buffer=False: Arrow's default pre-buffering reads a shard's whole column ahead of the
        batches (200 MB for 100k×512 float32), and its allocator (mimalloc) keeps freed pages
        mapped: streaming 1M×512 left 418 MB resident with it and 222 MB without (and ran
        faster). The pool is trimmed after each shard for the same reason.
        """
        for shard in self.shards:
            pf = pq.ParquetFile(shard.path, pre_buffer=False)
            for batch in pf.iter_batches(batch_size=batch_size, columns=list(columns)):
                yield shard, batch
            pa.default_memory_pool().release_unused()

    def iter_vectors(
        self, modality: str, batch_size: int = 16384, extra_columns: Sequence[str] = ("id",)
    ) -> Iterator[tuple[np.ndarray, pa.RecordBatch]]:
        """(vectors float32 (n, dim), other columns) for every row that has this modality."""
        col = EMBEDDING_COLUMNS[modality]
        for _, batch in self.iter_batches([col, *extra_columns], batch_size):
            vec = batch.column(col)
            if vec.null_count:
                batch = batch.filter(pc.is_valid(vec))
                vec = batch.column(col)
            if len(batch):
                yield fixed_list_to_numpy(vec), batch.drop_columns([col])

    def sample_vectors(self, modality: str, n: int, seed: int = 0) -> np.ndarray:
        """A uniform random sample of up to `n` vectors, read shard by shard (never all at once)."""
        total = self.count(modality)
        n = min(n, total)
        chosen = (
            np.arange(n) if n == total else np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
        )
        # Filled in place: collecting pieces and concatenating held the sample twice at the peak.
        out = np.empty((n, self.dim), np.float32)
        offset = 0
        for vec, _ in self.iter_vectors(modality, extra_columns=()):
            lo, hi = np.searchsorted(chosen, [offset, offset + len(vec)])
            if hi > lo:
                out[lo:hi] = vec[chosen[lo:hi] - offset]
            offset += len(vec)
        return out


def read_shard_meta(schema: pa.Schema, path: Path | str = "shard") -> dict[str, Any]:
    raw = (schema.metadata or {}).get(METADATA_KEY)
    if raw is None:
        raise UserError(f"{path} is not a retriever shard (no '{METADATA_KEY.decode()}' schema metadata).")
    try:
        meta = json.loads(raw)
        meta["model"], meta["dim"]  # noqa: B018 (what every reader needs)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} has damaged retriever metadata ({type(e).__name__}); rerun `retriever embed`."
        ) from None
    return meta


def _count_valid(pf: pq.ParquetFile, column: str) -> int:
    """Rows with a caption (hence a text embedding), from Parquet statistics when present."""
    md = pf.metadata
    leaf = next(j for j in range(md.num_columns) if md.schema.column(j).path == "caption")
    total = 0
    for rg in range(md.num_row_groups):
        stats = md.row_group(rg).column(leaf).statistics
        if stats is None or not stats.has_null_count:
            return int(pc.sum(pc.is_valid(pf.read(columns=[column]).column(0))).as_py() or 0)
        total += md.row_group(rg).num_rows - stats.null_count
    return total
