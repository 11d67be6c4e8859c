"""Issue 12's query language through the server's POST /v1/search: terms with weights and negatives,
where filters, dedup and keep_query, checked against the library's `Retriever.search` on the same
`Query`, over the emoji index whose rows carry folder metadata columns (dir, bytes, mtime)."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import serve_fixtures
from serve_fixtures import serve_index  # noqa: F401 (fixture)

from retriever.query import Query, Term
from retriever.search import Retriever
from retriever.serve.images import decode_upload

pytestmark = pytest.mark.usefixtures("one_torch_thread")
client = serve_fixtures.client  # a test client over serve_index, one per module


@pytest.fixture(scope="module")
def library(serve_index, tiny_model):  # noqa: F811
    with Retriever(serve_index, tiny_model) as r:
        yield r


def post(client, body):
    resp = client.post("/v1/search", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()


def ids(hits):
    return [h["id"] if isinstance(h, dict) else h.id for h in hits]


def test_plain_hits_carry_the_metadata_columns(client, library):
    body = post(client, {"text": "grinning face", "k": 5})
    assert body["query"] == "text" and body["report"] is None  # the batched path, unchanged
    want = library.search(text="grinning face", k=5)
    for got, h in zip(body["hits"], want):
        assert got["metadata"]["dir"] == h.metadata["dir"] and got["metadata"]["dir"].startswith("group")
        assert got["metadata"]["bytes"] == h.metadata["bytes"] > 0
        assert got["metadata"]["filename"] == Path(h.path).name


def test_negative_term_pushes_its_neighbours_down_as_in_the_library(client, library):
    plain = post(client, {"id": 3, "k": 10})
    near_b = plain["hits"][0]["id"]  # the item most like item 3
    body = post(client, {"id": 3, "terms": [{"id": near_b, "weight": 0.8, "negative": True}], "k": 10})
    want = library.search(Query((Term("id", 3), Term("id", near_b, 0.8, True)), k=10))
    assert body["query"] == "terms" and ids(body["hits"]) == ids(want)
    assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in want], atol=1e-4)
    assert ids(body["hits"]) != ids(plain["hits"])
    # item 3's neighbour is a query item, so it is left out; keep_query brings it back, ranked lower
    assert near_b not in ids(body["hits"]) and body["report"]["excluded_query_items"] == 2
    kept = post(client, {"id": 3, "terms": [{"id": near_b, "weight": 0.8, "negative": True}], "keep_query": True})
    assert ids(kept["hits"])[0] == 3 and near_b not in ids(kept["hits"])[:2]


def test_text_and_image_terms_match_the_library(client, library):
    data = Path(library.lookup("image", np.array([5]))[0].path).read_bytes()
    terms = [{"image": base64.b64encode(data).decode(), "weight": 2}, {"text": "flag", "negative": True}]
    body = post(client, {"text": "face", "terms": terms, "k": 6})
    picture = decode_upload(data)  # the server decodes uploads this way
    want = library.search(
        Query((Term("text", "face"), Term("image", picture, 2.0), Term("text", "flag", 1.0, True)), k=6)
    )
    assert ids(body["hits"]) == ids(want)
    assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in want], atol=1e-4)


def test_where_filter_returns_only_matching_rows_like_the_library(client, library):
    body = post(client, {"text": "face", "where": "dir = 'group1'", "k": 8})
    want = library.search(Query((Term("text", "face"),), k=8, where="dir = 'group1'"))
    assert len(body["hits"]) == 8 and ids(body["hits"]) == ids(want)
    assert {h["metadata"]["dir"] for h in body["hits"]} == {"group1"}
    rows = library.lookup("image", np.arange(64))
    assert body["report"]["matching_rows"] == sum(1 for h in rows if h.metadata["dir"] == "group1")
    unfiltered = post(client, {"text": "face", "k": 8})
    assert {h["metadata"]["dir"] for h in unfiltered["hits"]} != {"group1"}


def test_dedup_folds_near_duplicates(client, library):
    body = post(client, {"text": "face", "dedup": 0.5, "k": 5})
    want = library.search(Query((Term("text", "face"),), k=5, dedup=0.5))
    assert ids(body["hits"]) == ids(want)
    assert body["report"]["folded_duplicates"] > 0
    assert sum(h["absorbed"] for h in body["hits"]) == body["report"]["folded_duplicates"]
    assert [h["absorbed"] for h in body["hits"]] == [h.absorbed for h in want]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"text": "face", "where": "nosuchcol = 1"}, 400, "nosuchcol"),
        ({"text": "face", "where": "dir = "}, 400, "The where filter"),
        ({"text": "face", "where": "1; select 1"}, 400, ""),
        ({"terms": [{"text": "face", "negative": True}]}, 400, "negative"),
        ({"terms": [{"image": "not base64!"}]}, 400, "base64"),
        ({"terms": [{"text": "a", "id": 3}]}, 400, "exactly one"),
        ({"terms": [{"id": 99999}]}, 400, "99999"),
        ({"terms": [{"id": 2**70}]}, 404, "no indexed item"),
        ({"text": "face", "where": "read_csv('/etc/passwd') is not null"}, 400, "where filter"),
        ({"text": "face", "terms": [{"text": "x", "weight": "heavy"}]}, 400, "weight"),
        ({"vector": [0.1] * 4, "where": "dir = 'x'"}, 400, "vector"),
        ({"text": "face", "dedup": 2}, 422, "dedup"),
    ],
)
def test_bad_expressions_and_filters_are_one_sentence_4xx(client, body, status, words):
    resp = client.post("/v1/search", json=body)
    assert resp.status_code == status, resp.text
    msg = resp.json()["error"]
    assert words.lower() in msg.lower() and "Traceback" not in msg and msg.count("\n") == 0


def test_image_upload_takes_the_query_language_as_form_fields(client, library):
    """POST /v1/search/image: `text` (added, repeatable), `not_text` (subtracted), `where`, `dedup`,
    `keep_query` as form fields give the library's hits for the same Query."""
    item = library.lookup("image", np.array([9]))[0]
    data = Path(item.path).read_bytes()
    upload = {"file": ("q.png", data, "image/png")}
    plain = client.post("/v1/search/image", files=upload, data={"k": "8"}).json()
    assert plain["report"] is None and plain["hits"][0]["id"] == item.id  # no option: the plain path
    form = {
        "k": "8",
        "text": ["a flag", "a face"],
        "not_text": "a red heart",
        "where": "dir <> 'group0'",
        "dedup": "0.99",
    }
    resp = client.post("/v1/search/image", files=upload, data=form)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    terms = (Term("image", decode_upload(data)), Term("text", "a flag"), Term("text", "a face"),
             Term("text", "a red heart", negative=True))  # fmt: skip
    want = library.search(Query(terms, k=8, where="dir <> 'group0'", dedup=0.99))
    assert body["query"] == "terms" and ids(body["hits"]) == ids(want)
    assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in want], atol=1e-4)
    assert all(h["metadata"]["dir"] != "group0" for h in body["hits"])
    assert body["report"]["matching_rows"] == want.report.matching_rows
    assert ids(body["hits"]) != ids(plain["hits"])
    kept = client.post("/v1/search/image", files=upload, data={"k": "3", "keep_query": "true"}).json()
    assert kept["report"] is not None and kept["hits"][0]["id"] == item.id  # through the library


@pytest.mark.parametrize(
    "form, status, words",
    [
        ({"where": "nope = 1"}, 400, "nope"),
        ({"dedup": "2"}, 422, "dedup"),
        ({"dedup": "nan"}, 422, "finite"),
        ({"min_score": "inf"}, 422, "finite"),
        ({"keep_query": "maybe"}, 400, "true or false"),
        ({"text": "x" * 10_001}, 422, "at most"),
    ],
)
def test_image_upload_bad_form_fields_are_one_sentence_4xx(client, library, form, status, words):
    data = Path(library.lookup("image", np.array([9]))[0].path).read_bytes()
    resp = client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data=form)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["error"]
