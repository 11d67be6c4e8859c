"""`retriever search`: one query (texts, images, indexed items, weights, negatives) or a file of them."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from retriever.cli.common import (
    DeviceOpt,
    JsonOpt,
    Modality,
    PretrainedOpt,
    err,
    field_defaults,
    load_encoder,
    out,
    progress_bar,
    user_errors,
)
from retriever.data.limits import DEFAULT_MAX_PIXELS
from retriever.errors import UserError
from retriever.query import Query, Term

# Option defaults are the library's: one source of truth (query.py is torch-free).
QUERY = field_defaults(Query)


@user_errors
def search(
    index_dir: str = typer.Argument(
        ..., help="Index folder written by `retriever index`, or the URL of a running `retriever serve`."
    ),
    query: str | None = typer.Argument(
        None, help="Text query; [W:] sets a weight (2:snow), id:N an indexed item, image:PATH an image."
    ),
    image: Path | None = typer.Option(None, "--image", "-i", help="Query image file."),
    and_: list[str] = typer.Option([], "--and", help="Add a text term (repeatable; W:text weights it)."),
    not_: list[str] = typer.Option([], "--not", help="Subtract a text term (repeatable): results unlike it."),
    and_image: list[str] = typer.Option([], "--and-image", help="Add an image file term (repeatable)."),
    not_image: list[str] = typer.Option([], "--not-image", help="Subtract an image file term (repeatable)."),
    where: str | None = typer.Option(
        QUERY["where"],
        "--where",
        help="SQL condition over the index's columns (see `retriever info`), e.g. \"dir LIKE 'cats/%'\".",
    ),
    min_score: float | None = typer.Option(
        QUERY["min_score"], "--min-score", help="Drop hits whose cosine score is below this."
    ),
    dedup: float | None = typer.Option(
        QUERY["dedup"], "--dedup", help="Fold hits within this cosine of a better hit into it, e.g. 0.95."
    ),
    keep_query: bool = typer.Option(
        QUERY["keep_query"], "--keep-query", help="Keep the query's own images and items in the results."
    ),
    queries: Path | None = typer.Option(
        None, "--queries", help="File of queries: one text per line, or JSONL objects (see README)."
    ),
    out_file: Path | None = typer.Option(
        None, "--out", "-o", help="With --queries: JSONL results file (default stdout)."
    ),
    modality: Modality = typer.Option(Modality(QUERY["modality"]), help="What to retrieve: image or text (captions)."),
    k: int = typer.Option(QUERY["k"], "-k", help="Number of results."),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Model to encode the query (default: the one named in the index)."
    ),
    pretrained: str | None = PretrainedOpt,
    device: str | None = DeviceOpt,
    as_json: bool = JsonOpt,
    backend: str = typer.Option(
        "auto",
        "--backend",
        help="Query encoder: auto (the index's ONNX export when one matches, else torch), onnx (error without one) or torch.",
    ),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS,  # Retriever's keyword default
        "--max-pixels",
        help="Refuse a query image that decodes to more pixels than this (0: no limit but Pillow's own); "
        "JPEGs are decoded scaled down first.",
    ),
    querybank: bool = typer.Option(
        True,  # Retriever's keyword default
        "--querybank/--no-querybank",
        help="Rank text→image and image→text hits by cosine plus the index's querybank bias, where it has one.",
    ),
    server: str | None = typer.Option(None, "--server", help="Query this running server (http://HOST:PORT)."),
    api_key_file: Path | None = typer.Option(None, help="API key file for a server that needs one."),
):
    """Search an index: text → image, image → text, image → image, with +/- terms, filters and batches;
    locally or on a running server (one text or --image there)."""
    from retriever.serve.client import is_url

    if server or is_url(index_dir):
        local_only = {
            "--and": and_,
            "--not": not_,
            "--and-image": and_image,
            "--not-image": not_image,
            "--where": where is not None,
            "--min-score": min_score is not None,
            "--dedup": dedup is not None,
            "--keep-query": keep_query,
            "--queries": queries is not None,
            "--max-pixels": max_pixels != DEFAULT_MAX_PIXELS,  # the server applies its own limit
            "--no-querybank": not querybank,
        }
        extra = [flag for flag, used in local_only.items() if used]
        if extra:
            raise UserError(f"{', '.join(extra)} work on a local index folder; a server takes one text or --image.")
        if (query is None) == (image is None):
            raise UserError("Give a text query or --image PATH (exactly one).")
        if image is not None and not image.is_file():
            raise UserError(f"Query image {image} does not exist.")
        results = _remote(server, index_dir, query, image, k, modality.value, api_key_file)
        if as_json:
            out.print_json(json.dumps({"hits": [x.to_dict() for x in results]}))  # the local --json shape
            return
        _print_hits(results, f"{modality.value} results for {query or image} ({server or index_dir})")
        return
    from retriever.search import Retriever

    options = dict(modality=modality.value, k=k, where=where, min_score=min_score, dedup=dedup, keep_query=keep_query)
    if queries is not None:
        if query is not None or image is not None or and_ or not_ or and_image or not_image:
            raise UserError("Give either --queries FILE or one query on the command line, not both.")
        parsed = read_queries(queries, options)
        _check_out(out_file)
    else:
        if out_file is not None:
            raise UserError("--out goes with --queries; a single query prints its results.")
        if query is None and image is None:
            if and_ or and_image:
                raise UserError("Give the main query first: a text, --image PATH, or id:N.")
            raise UserError("Give a text query or --image PATH.")
        one = Query.of(
            query,
            str(image) if image is not None else None,
            and_=and_,
            not_=not_,
            and_images=and_image,
            not_images=not_image,
            **options,
        )
    _check_images(parsed if queries is not None else [(None, one)], queries)
    encoder = load_encoder(model, pretrained, device) if model else None
    with Retriever(
        Path(index_dir), encoder, device=device, backend=backend, max_pixels=max_pixels or None, querybank=querybank
    ) as r:
        terms = [t for _, q in parsed for t in q.terms] if queries is not None else list(one.terms)
        towers = {t.kind for t in terms} - {"id"}  # id:N terms use stored vectors: no model needed
        if towers:
            if encoder is None:
                with err.status("Loading model…"):  # the ONNX sessions, or torch when there is no export
                    r.query_encoder.prepare(next(iter(towers)) if len(towers) == 1 else None)
            if r.query_encoder.note:
                err.print(f"[yellow]{escape(r.query_encoder.note)}[/yellow]", highlight=False)
        if queries is not None:
            _run_batch(r, parsed, out_file)
            return
        hits = r.search(one)
    if as_json:
        out.print_json(json.dumps(hits.to_dict()))
        return
    _print_hits(hits, f"{modality.value} results for {query or image}")


def _print_hits(hits, title: str) -> None:
    columns = ["rank", "score", "id", "caption", "path"]
    query = getattr(hits, "query", None)  # a server's hits are a plain list
    show_absorbed = query is not None and query.dedup is not None
    meta_cols = sorted({c for h in hits for c in h.metadata})
    table = Table(*columns, *(["absorbed"] if show_absorbed else []), *meta_cols, title=title)
    from retriever.indexes.rows import json_value

    for x in hits:
        row = [str(x.rank), f"{x.score:.4f}", str(x.id), x.caption or "", x.path]
        row += [str(x.absorbed)] if show_absorbed else []
        row += ["" if x.metadata.get(c) is None else str(json_value(x.metadata.get(c))) for c in meta_cols]
        table.add_row(*(escape(c) for c in row))  # captions and metadata may hold [brackets]
    out.print(table)
    rep = getattr(hits, "report", None)
    if rep is None:
        return
    notes = []
    if rep.filter_strategy != "none":
        notes.append(f"filter: {rep.matching_rows} matching rows, {rep.filter_strategy}")
    if rep.below_min_score:
        notes.append(f"{rep.below_min_score} hits below --min-score dropped")
    if rep.folded_duplicates:
        notes.append(f"{rep.folded_duplicates} near-duplicates folded")
    if rep.excluded_query_items:
        notes.append(f"{rep.excluded_query_items} query items left out (--keep-query keeps them)")
    if notes:
        err.print("; ".join(notes), highlight=False)


def read_queries(path: Path, options: dict) -> list:
    """Every query of a --queries file, checked before anything runs: one text per line, or a
    JSON object per line (a line starting with `{`); blank lines and `#` comments are skipped."""
    if not path.is_file():
        raise UserError(f"Queries file {path} does not exist.")
    parsed, lines = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"Could not read queries file {path}: {e}") from e
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        try:
            if s.startswith("{"):
                try:
                    d = json.loads(s)
                except json.JSONDecodeError as e:
                    raise UserError(f"it is not valid JSON ({e.msg} at column {e.colno})") from None
                parsed.append(Query.from_dict(d, options))
            else:
                parsed.append(Query((Term.parse(s, "text"),), **options))
        except UserError as e:
            raise UserError(f"{path} line {n}: {str(e).rstrip('.')}.") from None
        lines.append(n)
    if not parsed:
        raise UserError(f"Queries file {path} has no queries.")
    return list(zip(lines, parsed))


def _check_images(parsed: list, queries: Path | None) -> None:
    """Missing image files are named before any model is loaded."""
    for n, q in parsed:
        for t in q.terms:
            if t.kind == "image" and not Path(str(t.value)).expanduser().is_file():
                where = f"{queries} line {n}: " if n is not None else ""
                raise UserError(f"{where}The query image {t.value} does not exist (text terms go in --and / --not).")


def _check_out(out_file: Path | None) -> None:
    if out_file is not None and out_file.exists() and out_file.is_dir():
        raise UserError(f"--out {out_file} is a folder; give a file name such as results.jsonl.")


def _run_batch(r, parsed: list, out_file: Path | None) -> None:
    from retriever.atomic import atomic_path
    from retriever.search import QueryError

    lines = [n for n, _ in parsed]
    with progress_bar() as bar:
        task = bar.add_task("Searching", total=len(parsed))
        try:
            results = r.search_batch([q for _, q in parsed], progress=lambda done, _: bar.update(task, completed=done))
        except QueryError as e:
            raise UserError(f"Queries file line {lines[e.position]}: {str(e).rstrip('.')}.") from None
    body = "".join(json.dumps({"line": n, **h.to_dict()}) + "\n" for n, h in zip(lines, results))
    if out_file is None:
        out.file.write(body)
        return
    with atomic_path(out_file) as tmp:  # all results or none: nothing half-written
        tmp.write_text(body, encoding="utf-8")
    err.print(f"{len(results)} queries → {out_file}", highlight=False)


def _remote(server, index_dir, query, image, k, modality, api_key_file):
    """A running server answers: no model load, no index open (milliseconds, not seconds)."""
    from retriever.serve.client import is_url, remote_search

    key = None
    if api_key_file is not None:
        from retriever.cli.serve import read_api_key

        key = read_api_key(api_key_file)
    url = server or index_dir
    # With --server, INDEX names an index on that server (a folder path: its name, as serve names it).
    index = Path(index_dir).name if server and not is_url(index_dir) else None
    return remote_search(url, text=query, image=image, k=k, modality=modality, index=index, api_key=key)
