"""Query expressions, metadata columns, --where filters, score floors, dedup and batches, on
hand-made vectors whose rankings are known, on synthetic shards, and through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from retriever.cli.app import app
from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.indexes.build import BuildConfig, build_index
from retriever.indexes.synthetic import ClipLike, write_synthetic_shards
from retriever.query import Query, Term
from retriever.search import Retriever
from retriever.shards import metadata_fields, shard_name, shard_schema, write_shard

runner = CliRunner()
D = 8


def unit(*pairs):
    v = np.zeros(D, np.float32)
    for axis, w in pairs:
        v[axis] += w
    return v / np.linalg.norm(v)


# Axes: 0 dog, 1 snow, 2 grass, 3 cat, 4..7 other things.
VECTORS = [
    unit((0, 1)),  # 0 dog
    unit((0, 1), (1, 1)),  # 1 dog in snow
    unit((0, 1), (2, 1)),  # 2 dog on grass
    unit((1, 1)),  # 3 snow
    unit((2, 1)),  # 4 grass
    unit((0, 1), (4, 0.05)),  # 5 a near-copy of 0 (cosine 0.9988)
    unit((3, 1)),  # 6 cat
    unit((3, 1), (1, 1)),  # 7 cat in snow
    unit((5, 1)),  # 8 something else
    unit((0, 1), (1, 1), (5, 0.05)),  # 9 a near-copy of 1
]
META = [
    {"year": 2018 + i % 4, "camera": ["X100", "GR", "X100", None][i % 4], "mixed": [1, "a", 2.5, None][i % 4]}
    for i in range(len(VECTORS))
]


@pytest.fixture(scope="module")
def handmade(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("handmade")
    identity = ModelIdentity("hand-made", None, "0" * 64, D)
    schema = shard_schema(identity, metadata_fields=metadata_fields(META))
    n = len(VECTORS)
    vecs = np.stack(VECTORS)
    write_shard(
        tmp / "shards" / shard_name(0),
        schema,
        list(range(n)),
        [f"/img/{i}.jpg" for i in range(n)],
        [f"caption {i}" for i in range(n)],
        vecs,
        vecs,
        np.ones(n, bool),
        META,
    )
    build_index(tmp / "shards", tmp / "index", BuildConfig(index_type="flat"))
    return tmp


def ids(hits):
    return [h.id for h in hits]


def test_weighted_and_negative_terms_rank_as_the_arithmetic_says(handmade):
    with Retriever(handmade / "index") as r:
        # dog + snow - grass: the snowy dog, then its near-copy; grass-things last.
        hits = r.search(Query((Term("id", 0), Term("id", 3), Term("id", 4, negative=True)), k=10))
        assert ids(hits)[:2] == [1, 9] and ids(hits)[-1] == 2
        assert not {0, 3, 4} & set(ids(hits))  # the query's own items are left out
        assert hits.report.excluded_query_items == 3
        kept = r.search(Query((Term("id", 0), Term("id", 3), Term("id", 4, negative=True)), k=3, keep_query=True))
        assert ids(kept)[:2] == [1, 9]
        # A weight tilts the balance: cat ×3 + snow → cat (0.95), cat in snow (0.89); snow ×3 → snow first.
        tilted = r.search(Query((Term("id", 6, weight=3.0), Term("id", 3)), k=2, keep_query=True))
        assert ids(tilted) == [6, 7]
        tilted = r.search(Query((Term("id", 6), Term("id", 3, weight=3.0)), k=2, keep_query=True))
        assert ids(tilted) == [3, 7]


def test_hits_carry_metadata_and_scores(handmade):
    with Retriever(handmade / "index") as r:
        hit = r.search("id:2", k=1, keep_query=True)[0]
        assert (hit.id, hit.metadata["year"], hit.metadata["camera"]) == (2, 2020, "X100")
        assert hit.metadata["mixed"] == "2.5"  # ints, text and floats in one column: text
        assert hit.score == pytest.approx(1.0, abs=1e-5)
        cols = r.columns("image")
        assert cols["year"] == "int64" and cols["camera"] == "string" and cols["mixed"] == "string"
        assert json.dumps(hit.to_dict())


def test_where_filters_return_the_k_best_matching(handmade):
    with Retriever(handmade / "index") as r:
        hits = r.search("id:0", k=3, where="camera = 'X100'")
        # Rows 0, 2, 4, 6, 8 are X100; 0 is the query; 2 is the only one near a dog, the rest tie at 0.
        assert ids(hits)[0] == 2 and set(ids(hits)) <= {2, 4, 6, 8}
        assert all(h.metadata["camera"] == "X100" for h in hits)
        assert hits.report.matching_rows == 5 and hits.report.filter_strategy == "prefilter-gathered"
        assert len(hits) == 3
        hits = r.search("id:0", k=10, where="year >= 2020 AND camera IS NOT NULL")
        assert {h.id for h in hits} == {2, 6}
        assert r.search("id:0", k=3, where="path GLOB '/img/[12].jpg'").__len__() == 2
        assert len(r.search("id:0", k=3, where="year > 3000")) == 0


@pytest.mark.parametrize(
    "where, words",
    [
        ("yeer > 2000", ["'yeer'", "year (integer)"]),
        ("year >", ["not a valid SQL condition"]),
        ("year > 'old'", ["year is integer"]),
        ("year + 1", ["not a condition"]),
        ("year > 1; DROP TABLE rows", ["';'"]),
        ("year IN (SELECT * FROM read_csv('/etc/passwd'))", ["could not be evaluated"]),
    ],
)
def test_bad_filters_are_one_sentence(handmade, where, words):
    with Retriever(handmade / "index") as r, pytest.raises(UserError) as e:
        r.search("id:0", where=where)
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_min_score_drops_and_counts(handmade):
    with Retriever(handmade / "index") as r:
        hits = r.search("id:0", k=5, min_score=0.5)
        assert all(h.score >= 0.5 for h in hits)
        # cosines to dog: 5 → 0.9988, 1 and 2 and 9 → 0.707; the fifth best is 0.
        assert ids(hits) == [5, 1, 2, 9] or ids(hits)[:1] == [5]
        assert len(hits) == 4 and hits.report.below_min_score == 1


def test_dedup_folds_near_copies_into_the_better_hit(handmade):
    with Retriever(handmade / "index") as r:
        plain = r.search("id:1", k=4, keep_query=True)
        assert ids(plain)[:2] == [1, 9]  # the snowy dog and its near-copy, then dog (0) and its copy (5)
        hits = r.search("id:1", k=4, dedup=0.99, keep_query=True)
        assert ids(hits)[0] == 1 and hits[0].absorbed == 1
        assert not {9, 5} & set(ids(hits)) and len(hits) == 4
        assert hits[1].id in (0, 3) and hits.report.folded_duplicates == 2


def test_batch_matches_single_searches_and_accepts_dicts(handmade):
    with Retriever(handmade / "index") as r:
        batch = r.search_batch(
            [
                "id:0",
                {"terms": [{"id": 6, "weight": 3}, {"id": 3}], "k": 2, "keep_query": True},
                Query((Term("id", 3),), k=2),
            ],
            defaults={"k": 3},
        )
        assert [ids(h) for h in batch] == [
            ids(r.search("id:0", k=3)),
            [6, 7],
            ids(r.search("id:3", k=2)),
        ]


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: Query(()), "empty"),
        (lambda: Term.parse("1.2.3:dog"), "not a number"),
        (lambda: Term("text", "dog", weight="heavy"), "not a number"),
        (lambda: Query.from_dict({"text": "dog", "min_score": 1.5}), "between -1 and 1"),
        (lambda: Query((Term("text", "dog", negative=True),)), "only negative"),
        (lambda: Query.from_dict({"text": "dog", "colour": "red"}), "Unknown query field"),
        (lambda: Term.parse("id:abc"), "whole number"),
    ],
)
def test_bad_queries_are_one_sentence(make, words):
    with pytest.raises(UserError, match=words):
        make()


def test_missing_ids_and_images_are_named(handmade, tmp_path):
    with Retriever(handmade / "index") as r:
        with pytest.raises(UserError, match="id 99"):
            r.search("id:99")
        with pytest.raises(UserError, match="does not exist"):
            r.search(Query((Term("id", 0), Term("image", str(tmp_path / "nope.jpg")))))
        with pytest.raises(UserError, match="cancel out"):
            r.search(Query((Term("id", 0), Term("id", 0, negative=True)), keep_query=True))


# --- Filtered search on an approximate index: exact k best at any selectivity ---------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    gen = ClipLike(dim=32, latent=8, clusters=50, seed=3)
    write_synthetic_shards(tmp / "shards", gen, 6000, shard_rows=2000)
    build_index(tmp / "shards", tmp / "ivf", BuildConfig(index_type="ivf", flat_max=0))
    build_index(tmp / "shards", tmp / "ivfpq", BuildConfig(index_type="ivfpq", flat_max=0))
    vecs = np.concatenate(
        [v for v, _ in __import__("retriever").ShardSet(tmp / "shards").iter_vectors("image", extra_columns=())]
    )
    return tmp, gen, vecs


def exact_filtered(vecs, q, mask, k):
    s = vecs @ q
    s[~mask] = -np.inf
    return np.argsort(-s, kind="stable")[:k]


@pytest.mark.parametrize(
    "index, where, strategy",
    [
        ("ivf", "bucket < 500", "postfilter"),
        ("ivf", "bucket < 5", "prefilter-gathered"),
        ("ivf", "bucket < 5", "prefilter"),
        ("ivfpq", "bucket < 5", "prefilter"),
        ("ivfpq", "bucket < 500", "postfilter"),
    ],
)
def test_filtered_search_finds_the_exact_k_best_at_any_selectivity(synthetic, monkeypatch, index, where, strategy):
    from retriever.indexes import open as open_mod

    monkeypatch.setattr(open_mod, "GATHER_ROWS", 0)  # as if the 6,000 rows were millions
    if strategy == "prefilter":  # too many rows to gather: the faiss IDSelectorBitmap scan
        monkeypatch.setattr(open_mod, "GATHER_BYTES", 0)
    tmp, gen, vecs = synthetic
    q = gen.sample(20, stream=9)
    bucket = np.arange(len(vecs)) % 1000
    mask = bucket < (500 if "500" in where else 5)
    with Retriever(tmp / index) as r:
        results = r.search_vectors(q, 10, where=where)
        for hits in results:
            assert len(hits) == 10 and hits.report.filter_strategy == strategy
            assert all(h.metadata["bucket"] < (500 if "500" in where else 5) for h in hits)
        recall = np.mean(
            [len(set(ids(h)) & set(exact_filtered(vecs, q[i], mask, 10).tolist())) / 10 for i, h in enumerate(results)]
        )
        unfiltered = r.search_vectors(q, 10)
        base = np.mean(
            [
                len(set(ids(h)) & set(exact_filtered(vecs, q[i], np.ones_like(mask), 10).tolist())) / 10
                for i, h in enumerate(unfiltered)
            ]
        )
    assert recall >= min(base, 0.99) - 0.02  # no worse than the unfiltered index
    if strategy.startswith("prefilter"):
        assert recall == 1.0  # both pre-filters score every matching row exactly


def test_dedup_works_on_pq_through_reconstruction(synthetic):
    tmp, gen, vecs = synthetic
    q = vecs[:5]
    with Retriever(tmp / "ivfpq") as r:
        for hits in r.search_vectors(q, 10, dedup=0.9):
            v = vecs[ids(hits)]
            sims = v @ v.T - 2 * np.eye(len(v))
            assert len(hits) == 10 and sims.max() < 0.9 + 0.02  # decoded PQ vectors are approximate


def test_collection_dedup_finds_planted_copies(synthetic, tmp_path):
    from retriever.dedup import find_duplicates

    tmp, gen, vecs = synthetic
    res = find_duplicates(tmp / "shards", tmp_path / "g.parquet", threshold=0.999)
    groups = pq.read_table(tmp_path / "g.parquet").to_pylist()
    # Ground truth by brute force over all pairs.
    sims = vecs @ vecs.T
    np.fill_diagonal(sims, 0)
    truth = {int(i) for i in np.flatnonzero((sims >= 0.999).any(axis=1))}
    assert {g["id"] for g in groups} == truth
    assert res.groups == sum(g["representative"] for g in groups)
    assert all(g["group"] <= g["id"] for g in groups)


# --- Metadata from sources into shards, and the CLI ------------------------------------------------


def test_manifest_columns_keep_their_types(tmp_path, emoji_items):
    from retriever.data.sources import read_source

    rows = ["image,caption,year,rating,ok,place"]
    for i, it in enumerate(emoji_items[:4]):
        rows.append(
            f"{it.path},{it.captions[0]},{2020 + i},{i / 2},{'true' if i % 2 else 'false'},{'' if i == 1 else 'x'}"
        )
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    items = read_source(tmp_path / "m.csv")
    assert items[1].metadata == {"year": 2021, "rating": 0.5, "ok": True, "place": None}
    fields = {f.name: f.type for f in metadata_fields(it.metadata for it in items)}
    assert fields == {"year": pa.int64(), "rating": pa.float64(), "ok": pa.bool_(), "place": pa.string()}
    assert {f.name: f.type for f in items.metadata_fields} == fields  # what embed uses, read off Arrow


def run(*args, code=0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output + (str(res.exception) if res.exception else "")
    return res


def test_cli_expressions_filters_and_batches(handmade, tmp_path):
    idx = handmade / "index"
    res = run("search", idx, "id:0", "--and", "id:3", "--not", "id:4", "-k", "2", "--json")
    assert [h["id"] for h in json.loads(res.stdout)["hits"]] == [1, 9]
    res = json.loads(run("search", idx, "id:0", "--where", "camera = 'X100'", "--json").stdout)
    assert res["filter_strategy"] == "prefilter-gathered" and res["matching_rows"] == 5
    res = json.loads(run("search", idx, "id:0", "-k", "5", "--min-score", "0.5", "--json").stdout)
    assert res["below_min_score"] == 1 and len(res["hits"]) == 4
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        'id:0\n\n{"terms": [{"id": 6, "weight": 3}, {"id": 3}], "k": 2, "tag": "cats", "keep_query": true}\n'
    )
    run("search", idx, "--queries", qfile, "--out", tmp_path / "r.jsonl", "-k", "3")
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["line"] for x in lines] == [1, 3] and lines[1]["tag"] == "cats"
    assert [h["id"] for h in lines[1]["hits"]] == [6, 7] and len(lines[0]["hits"]) == 3


@pytest.mark.parametrize(
    "args, words",
    [
        (["--min-score", "1.5"], "between -1 and 1"),
        (["--where", "nope = 1"], "'nope'"),
        (["--and-image", "/no/such.png"], "does not exist"),
    ],
)
def test_cli_bad_input_one_sentence(handmade, args, words):
    res = run("search", handmade / "index", "id:0", *args, code=1)
    assert words in res.output and "Traceback" not in res.output


def test_cli_malformed_queries_line_is_named(handmade, tmp_path):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text('id:0\n{"text": "dog", "weight": \n')
    res = run("search", handmade / "index", "--queries", qfile, "--out", tmp_path / "r.jsonl", code=1)
    assert "line 2" in res.output and not (tmp_path / "r.jsonl").exists()
    qfile.write_text("id:0\nid:77\n")
    res = run("search", handmade / "index", "--queries", qfile, "--out", tmp_path / "r.jsonl", code=1)
    assert "line 2" in res.output and "id 77" in res.output and not (tmp_path / "r.jsonl").exists()
    qfile.write_text('{"terms": [{"text": "dog", "weight": "heavy"}]}\n')
    res = run("search", handmade / "index", "--queries", qfile, code=1)
    assert "line 1" in res.output and "not a number" in res.output


def test_added_rows_without_metadata_get_nulls(handmade, tmp_path):
    import shutil

    from retriever.indexes.add import add_to_index

    idx = tmp_path / "index"
    shutil.copytree(handmade / "index", idx)
    schema = shard_schema(ModelIdentity("hand-made", None, "0" * 64, D))  # no metadata columns
    v = np.stack([unit((6, 1)), unit((7, 1))])
    write_shard(
        tmp_path / "new" / shard_name(0),
        schema,
        [100, 101],
        ["/img/a.jpg", "/img/b.jpg"],
        [None, None],
        v,
        np.zeros_like(v),
        np.zeros(2, bool),
    )
    add_to_index(idx, tmp_path / "new")
    with Retriever(idx) as r:
        hit = r.search_vectors(v[:1], 1)[0][0]
        assert hit.id == 100 and hit.metadata == {"year": None, "camera": None, "mixed": None}
        assert len(r.search("id:100", where="year IS NULL", k=5)) == 1  # 101 (100 is the query)
