"""`retriever info`: what a shard folder or an index holds."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from retriever.cli.common import JsonOpt, out, user_errors


@user_errors
def info(
    path: Path = typer.Argument(..., help="A shard folder or an index folder."),
    check: bool = typer.Option(False, "--check", help="Read each index file whole, as a search would (slower)."),
    as_json: bool = JsonOpt,
):
    """Describe shards or an index: model, counts, index types and search parameters."""
    from retriever.info import folder_info, to_json

    d = folder_info(path, check=check)
    if as_json:
        out.print_json(to_json(d))
        return
    table = Table("field", "value", title=f"{d['kind']}: {d['path']}", show_header=False)
    model = d["model"]
    table.add_row("model", f"{model['name']} ({model.get('pretrained') or 'no pretrained tag'})")
    table.add_row("weights sha256", model["weights_sha256"])
    table.add_row("embedding dim", str(model["embed_dim"]))
    if d["kind"] == "shards":
        for key in (
            "rows",
            "rows_with_caption",
            "shards",
            "bytes",
            "dtype",
            "normalized",
            "skipped_images",
            "errors_file",
        ):
            table.add_row(key, str(d[key]))
        cols = d.get("metadata_columns") or {}
        table.add_row("metadata columns", escape(", ".join(f"{k} ({v})" for k, v in cols.items()) or "none"))
        if d.get("parts"):
            st = d["parts"]
            row = f"{len(st['complete'])} of {st['num_parts']} complete"
            row += "".join(f"; part {p}: {s}" for p, s in st["partial"].items())
            row += "".join(f"; part {p}: not started" for p in st["not_started"])
            table.add_row("parts", row)
    else:
        table.add_row("bytes", str(d["bytes"]))
        table.add_row(
            "shards", f"{d['shards']['folder']} ({d['shards']['rows']} rows, {len(d['shards']['files'])} files)"
        )
        for a in d["shards"].get("added", []):
            table.add_row("  added", f"{a['folder']} ({a['rows']} rows, ids shifted by {a['id_offset']})")
        for name, m in d["indexes"].items():
            params = ", ".join(f"{k}={v}" for k, v in m["search_params"].items()) or "exact"
            table.add_row(f"{name} index", f"{m['count']} vectors, {m['factory']} ({params}), built on {m['built_on']}")
            if m.get("columns"):
                table.add_row("  columns", escape(", ".join(f"{k} ({v})" for k, v in m["columns"].items())))
            if m.get("ivfdata_file"):
                table.add_row("  inverted lists", f"on disk, memory-mapped ({m['ivfdata_file']})")
            if m.get("rerank") == "mmap":
                table.add_row("  re-ranking", f"exact, vectors read from disk ({', '.join(m['vectors_files'])})")
            for key, value in m.get("extra", {}).items():
                if key == "tuning":
                    t = value
                    status = "reached" if t["reached"] else "NOT reached (best setting kept)"
                    params = ", ".join(f"{a}={b}" for a, b in t["params"].items()) or "exact"
                    table.add_row(
                        "  tuning",
                        f"target recall@{t['k']} {t['target']} {status}: {params} → recall {t['recall']:.4f}, "
                        f"{t['qps']:.0f} queries/s ({t['latency_ms']:.2f} ms/query batched, {t['queries']} queries, "
                        f"{len(t['tried'])} settings tried)"
                        + (f"; tuned at {t['tuned_at_count']} vectors" if "tuned_at_count" in t else ""),
                    )
                elif key.endswith("_bytes"):
                    from retriever.indexes.memory import format_bytes

                    table.add_row(f"  {key[:-6].replace('_', ' ')}", format_bytes(value))
                else:
                    table.add_row(f"  {key}", json.dumps(value) if not isinstance(value, str) else value)
    out.print(table)
