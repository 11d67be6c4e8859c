"""The on-disk index folder: faiss files, row metadata and a JSON manifest.

    INDEX/
      manifest.json        model identity, shard set, and per modality: count, factory string,
                           search parameters, files; `rows` says how faiss rows map to ids
      image.faiss          faiss index over image embeddings
      image.rows.arrow     Arrow IPC file, row i = faiss row i: id, path, caption
      text.faiss / text.rows.arrow   the same over caption embeddings (rows with a caption)
      image.ivfdata        (on-disk indexes) the inverted lists, memory-mapped at search time
      image.trained.faiss  (on-disk indexes) the trained empty index, to add blocks without retraining
      image.vectors*.npy   (re-ranking from disk) float32 vectors in row order, one file per build/add
      querybank.safetensors  (a model with a querybank) its bank, to bias rows that --add appends;
                           the rows files then hold each row's bias (retriever.querybank)

The rows file is uncompressed Arrow so that search memory-maps it and reads only the k hits.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from retriever.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "retriever-index/1"
MODALITIES = ("image", "text")


@dataclass
class ModalityIndex:
    modality: str  # what the index holds: "image" or "text" vectors
    count: int
    dim: int
    factory: str
    search_params: dict[str, Any]
    file: str
    rows_file: str
    metric: str = "inner_product"
    rows: str = "row i of the faiss index is row i of rows_file (columns id, path, caption)"
    built_on: str = "cpu"
    build_seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # tuning results, budget and the like
    # Added by the scale work; absent from older manifests, whose defaults mean "not used".
    rerank: str = ""  # "mmap": search_params["rerank_k_factor"]·k candidates re-ranked from vectors_files
    vectors_files: list[str] = field(default_factory=list)
    ivfdata_file: str = ""  # set when the inverted lists are on disk
    trained_file: str = ""


@dataclass
class IndexManifest:
    model: dict[str, Any]
    shards: dict[str, Any]  # {"folder": str, "files": [{"name", "rows", "text_rows"}], "rows": int}
    indexes: dict[str, ModalityIndex]
    format: str = FORMAT
    retriever_version: str = ""
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["indexes"] = {k: asdict(v) for k, v in self.indexes.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexManifest:
        if d.get("format") != FORMAT:
            raise UserError(f"Unsupported index format {d.get('format')!r} (expected {FORMAT}).")
        known = set(ModalityIndex.__dataclass_fields__)
        idx = {k: ModalityIndex(**{f: x for f, x in v.items() if f in known}) for k, v in d["indexes"].items()}
        return cls(d["model"], d["shards"], idx, d["format"], d.get("retriever_version", ""), d.get("created", ""))


def read_index_manifest(index_dir: str | Path) -> IndexManifest:
    path = Path(index_dir).expanduser() / MANIFEST
    if not path.is_file():
        raise UserError(
            f"{Path(index_dir)} is not a retriever index (no {MANIFEST}); build one with `retriever index`."
        )
    try:
        return IndexManifest.from_dict(json.loads(path.read_bytes()))
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(
            f"{path} is damaged ({type(e).__name__}: {e}); rebuild the index with `retriever index SHARDS --out "
            f"{Path(index_dir)}`."
        ) from None


# Names an index folder holds (see the module docstring); anything else means the folder is not ours.
_INDEX_FILE = re.compile(
    r"^(manifest\.json|[a-z]+(\.trained)?\.faiss|[a-z]+\.rows\.arrow|[a-z]+\.ivfdata"
    r"|[a-z]+\.vectors(\.\d+)?\.npy|\.block-\d+\.faiss|\..*\.tmp"
    r"|onnx|querybank\.safetensors)$"  # onnx/: the model's export (retriever.onnx); the model's querybank
)


def check_replaceable(out: str | Path, shards_folder: str | Path | None = None) -> None:
    """Refuse to replace `out` unless it is absent, an empty folder, or a retriever index.

    An index is recognised by its manifest and by holding nothing but index files, so a folder of
    photos with a stray manifest.json is not mistaken for one (issue 10: `--out` deleted whatever
    was there).
    """
    out = Path(out).expanduser()
    if shards_folder is not None and out.exists():
        a, b = out.resolve(), Path(shards_folder).resolve()
        if a == b or a in b.parents or b in a.parents:
            raise UserError(
                f"--out {out} overlaps the shard folder {shards_folder}; write the index to its own folder."
            )
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a retriever index; refusing to replace it, choose a new folder.")
    names = [p.name for p in out.iterdir()]
    if not names:
        return
    strangers = [n for n in names if not _INDEX_FILE.match(n)]
    if MANIFEST not in names or strangers:
        shown = ", ".join(sorted(strangers)[:3]) or "no manifest.json"
        raise UserError(
            f"--out {out} is not a retriever index ({shown}); refusing to replace it, choose a new or empty folder."
        )
