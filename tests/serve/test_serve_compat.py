"""clip-retrieval's clients against `retriever serve`: their exact requests, byte for byte.

The bodies below are what clip-retrieval 2.45 sends: `ClipClient.query` posts
`json.dumps({...})` through requests' `data=` (so no Content-Type header, Python's ", "/": "
separators, its key order); the front's ClipService posts `JSON.stringify({...})` with fetch (so
Content-Type text/plain;charset=UTF-8, compact separators, its key order, nulls kept).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from serve_fixtures import make_client, serve_index  # noqa: F401 (fixture)

from retriever.search import Retriever

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRONT = {"content-type": "text/plain;charset=UTF-8"}


@pytest.fixture(scope="module")
def client(serve_index, tiny_model):  # noqa: F811
    with make_client(serve_index, tiny_model, watch_seconds=0) as c:
        yield c


def clip_client_body(text=None, image=None, embedding_input=None, modality="image", num_images=40) -> bytes:
    # ClipClient defaults: use_mclip False, aesthetic_score 9, aesthetic_weight 0.5, deduplicate True,
    # use_safety_model True, use_violence_detector True; num_result_ids = num_images.
    return (
        f'{{"text": {json.dumps(text)}, "image": {json.dumps(image)}, "image_url": null, '
        f'"embedding_input": {json.dumps(embedding_input)}, "deduplicate": true, "use_safety_model": true, '
        f'"use_violence_detector": true, "indice_name": "emoji", "use_mclip": false, "aesthetic_score": 9, '
        f'"aesthetic_weight": 0.5, "modality": "{modality}", "num_images": {num_images}, '
        f'"num_result_ids": {num_images}}}'
    ).encode()


def front_body(text="", image=None, modality="image") -> bytes:
    # The front's defaults: numImages 40, numResultIds 3000, hideDuplicateImages/safeMode/removeViolence
    # true, aestheticScore '', aestheticWeight '0.5'.
    return (
        f'{{"text":{json.dumps(text, separators=(",", ":"))},"image":{json.dumps(image)},"image_url":null,'
        f'"embedding_input":null,"modality":"{modality}","num_images":40,"indice_name":"emoji",'
        f'"num_result_ids":3000,"use_mclip":false,"deduplicate":true,"use_safety_model":true,'
        f'"use_violence_detector":true,"aesthetic_score":"","aesthetic_weight":"0.5"}}'
    ).encode()


def test_bodies_are_what_the_clients_send():
    """Guard the literals above against drift: they parse to the clients' dictionaries."""
    cc = json.loads(clip_client_body(text="a cat"))
    assert list(cc) == [
        "text", "image", "image_url", "embedding_input", "deduplicate", "use_safety_model",
        "use_violence_detector", "indice_name", "use_mclip", "aesthetic_score", "aesthetic_weight",
        "modality", "num_images", "num_result_ids",
    ]  # fmt: skip
    assert clip_client_body(text="a cat") == json.dumps({**cc}).encode()
    fr = json.loads(front_body(text="a cat"))
    assert front_body(text="a cat") == json.dumps(fr, separators=(",", ":")).encode()


def test_indices_list_and_config(client):
    assert client.get("/indices-list").json() == ["emoji"]
    cfg = client.get("/config.json").json()
    assert cfg == {"defaultBackend": "http://testserver", "defaultIndex": "emoji", "urlColumn": "url"}


def test_clip_client_text_query_without_content_type(client, serve_index, tiny_model):  # noqa: F811
    body = clip_client_body(text="grinning face", num_images=5)
    resp = client.post("/knn-service", content=body)
    assert resp.status_code == 200, resp.text
    hits = resp.json()
    assert 1 <= len(hits) <= 5
    for h in hits:
        assert set(h) == {"id", "similarity", "caption", "url"}
        assert h["url"] == f"http://testserver/v1/indexes/emoji/items/{h['id']}/image"
        assert client.get(h["url"]).status_code == 200
    want = Retriever(serve_index, tiny_model).search(text="grinning face", k=5)
    assert hits[0]["id"] == want[0].id
    assert np.isclose(hits[0]["similarity"], want[0].score, atol=1e-4)
    # deduplicate=True (ClipClient's default) leaves no two hits with near-identical vectors.
    nodedup = client.post("/knn-service", content=body.replace(b'"deduplicate": true', b'"deduplicate": false'))
    assert [h["id"] for h in nodedup.json()] == [h.id for h in want]
    assert {h["id"] for h in hits} <= {h.id for h in want}


def test_clip_client_image_and_embedding_queries(client, serve_index, tiny_model):  # noqa: F811
    r = Retriever(serve_index, tiny_model)
    item = r.lookup("image", np.array([12]))[0]
    b64 = base64.b64encode(Path(item.path).read_bytes()).decode()
    hits = client.post("/knn-service", content=clip_client_body(image=b64, num_images=3)).json()
    assert hits[0]["id"] == item.id and hits[0]["similarity"] > 0.999
    vec = r.search(text="dog", k=1)
    from retriever.models.encode import encode_texts

    emb = encode_texts(tiny_model, ["dog"])[0].tolist()
    by_emb = client.post("/knn-service", content=clip_client_body(embedding_input=emb, num_images=1)).json()
    assert by_emb[0]["id"] == vec[0].id
    captions = client.post("/knn-service", content=clip_client_body(text="dog", modality="text", num_images=4)).json()
    assert all(isinstance(h["caption"], str) for h in captions)


def test_front_text_search_then_metadata_paging(client):
    resp = client.post("/knn-service", content=front_body(text="flag"), headers=FRONT)
    assert resp.status_code == 200, resp.text
    hits = resp.json()
    # num_result_ids 3000 is clamped to the index: hits past num_images carry only id + similarity.
    assert 0 < len(hits) <= 64
    with_meta = [h for h in hits if "url" in h]
    assert len(with_meta) == min(40, len(hits))
    assert all(set(h) == {"id", "similarity"} for h in hits[40:])
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)
    ids = [h["id"] for h in hits[:5]]
    body = json.dumps({"ids": ids, "indice_name": "emoji"}, separators=(",", ":")).encode()
    meta = client.post("/metadata", content=body, headers=FRONT).json()
    assert [m["id"] for m in meta] == ids
    assert all(m["metadata"]["url"].endswith(f"/items/{m['id']}/image") and "caption" in m["metadata"] for m in meta)
    empty = client.post("/metadata", content=b'{"ids":[],"indice_name":"emoji"}', headers=FRONT)
    assert empty.json() == []


def test_front_image_upload_sends_data_url_payload(client, serve_index, tiny_model):  # noqa: F811
    item = Retriever(serve_index, tiny_model).lookup("image", np.array([20]))[0]
    b64 = base64.b64encode(Path(item.path).read_bytes()).decode()  # reader.result.split(',')[1]
    hits = client.post("/knn-service", content=front_body(image=b64), headers=FRONT).json()
    assert hits[0]["id"] == item.id


def test_unsupported_or_bad_requests_answer_one_sentence(client):
    url = client.post(
        "/knn-service",
        content=b'{"image_url": "http://169.254.169.254/latest", "modality": "image", "num_images": 3, "indice_name": "emoji"}',
    )
    assert url.status_code == 400 and "does not fetch image URLs" in url.json()["error"]  # no --allow-image-urls
    assert client.post("/knn-service", content=b"not json").status_code == 400
    assert client.post("/knn-service", content=b"[1, 2]").status_code == 400
    none = client.post("/knn-service", content=b'{"modality": "image", "num_images": 3, "indice_name": "emoji"}')
    assert none.status_code == 400 and "text, image or embedding_input" in none.json()["error"]
    missing = client.post("/knn-service", content=clip_client_body(text="x").replace(b'"emoji"', b'"laion5B"'))
    assert missing.status_code == 404 and "laion5B" in missing.json()["error"]
    assert client.post("/metadata", content=b'{"ids": ["a"], "indice_name": "emoji"}').status_code == 400


def test_front_similar_button_sends_a_hits_own_url_answered_without_fetching(client):
    """The front's "similar" button posts a hit's `url` back as image_url. It names this server's item,
    so it is answered from the index (the item first, at similarity 1, as clip_back's re-encoded
    download would be), with URL fetching off; another host's URL is still refused."""
    hits = client.post("/knn-service", content=front_body(text="flag"), headers=FRONT).json()
    item = hits[3]
    body = json.loads(front_body(text=""))
    body.update(image_url=item["url"], num_images=5, num_result_ids=5)
    similar = client.post("/knn-service", content=json.dumps(body, separators=(",", ":")), headers=FRONT)
    assert similar.status_code == 200, similar.text
    got = similar.json()
    assert got[0]["id"] == item["id"] and got[0]["similarity"] > 0.999
    assert [h["id"] for h in got] != [h["id"] for h in hits[:5]]
    thumb = client.post("/v1/search", json={"image_url": item["url"].replace("/image", "/thumbnail"), "k": 1})
    assert thumb.status_code == 200 and thumb.json()["hits"][0]["id"] == item["id"]
    for url in (
        item["url"].replace("testserver", "elsewhere.example"),  # another host: a fetch, which is off
        "http://testserver/v1/indexes/emoji/items/1/../../../../etc/passwd",
    ):
        body.update(image_url=url)
        r = client.post("/knn-service", content=json.dumps(body))
        assert r.status_code == 400 and "does not fetch image URLs" in r.json()["error"], url
    body.update(image_url="http://testserver/v1/indexes/emoji/items/999999999/image")
    assert client.post("/knn-service", content=json.dumps(body)).status_code == 404
    body.update(image_url="http://testserver/v1/indexes/nope/items/1/image")
    assert client.post("/knn-service", content=json.dumps(body)).status_code == 404


def test_knn_service_takes_terms_and_where_in_clip_backs_answer_shape(client, serve_index, tiny_model):  # noqa: F811
    """Extras clip-retrieval's clients never send: `terms` and `where` go through Retriever.search with
    the clip query first (its own items kept, `deduplicate` as the library's fold at 0.94); the
    answer keeps clip_back's shape, and requests without them are unchanged."""
    from retriever.query import Query as LibQuery

    r = Retriever(serve_index, tiny_model)
    body = json.loads(front_body(text="flag"))
    body.update(num_images=6, num_result_ids=6, deduplicate=False, where="dir = 'group2'",
                terms=[{"text": "a red heart", "negative": True}])  # fmt: skip
    resp = client.post("/knn-service", content=json.dumps(body), headers=FRONT)
    assert resp.status_code == 200, resp.text
    hits = resp.json()
    want = r.search(LibQuery.from_dict({"text": "flag", "terms": body["terms"], "where": body["where"], "k": 6,
                                        "keep_query": True}))  # fmt: skip
    assert [h["id"] for h in hits] == [h.id for h in want] and len(hits) == 6
    assert all(set(h) == {"id", "similarity", "url", "caption"} for h in hits)
    assert all(h.metadata["dir"] == "group2" for h in want)
    plain = client.post("/knn-service", content=front_body(text="flag"), headers=FRONT).json()
    assert [h["id"] for h in plain[:6]] != [h["id"] for h in hits]
    own = json.loads(front_body(text=""))
    own.update(image_url=plain[2]["url"], num_images=3, num_result_ids=3, where="dir = 'group2'")
    similar = client.post("/knn-service", content=json.dumps(own)).json()
    assert len(similar) == 3 and all(
        r.lookup("image", np.array([h["id"]]))[0].metadata["dir"] == "group2" for h in similar
    )
    bad = client.post("/knn-service", content=json.dumps({**body, "where": "nope = 1"}))
    assert bad.status_code == 400 and "where filter names column 'nope'" in bad.json()["error"]
    vec = client.post("/knn-service", content=json.dumps({"embedding_input": [0.1] * 8, "where": "id > 0"}))
    assert vec.status_code == 400 and "embedding_input takes no terms" in vec.json()["error"]
