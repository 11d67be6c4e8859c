"""The HTTP server's native API, security and reload, through FastAPI's TestClient (no sockets)."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import serve_fixtures
from PIL import Image
from serve_fixtures import make_client, serve_index  # noqa: F401 (fixture)

from retriever.search import Retriever

pytestmark = pytest.mark.usefixtures("one_torch_thread")
client = serve_fixtures.client  # a test client over serve_index, one per module


@pytest.fixture(scope="module")
def rows(serve_index, tiny_model):  # noqa: F811
    r = Retriever(serve_index, tiny_model)
    return r.lookup("image", np.arange(64))


def png_bytes(size=(32, 32), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


def test_text_search_matches_in_process_retriever(client, serve_index, tiny_model):  # noqa: F811
    r = Retriever(serve_index, tiny_model)
    want = r.search(text="grinning face", k=5)
    resp = client.post("/v1/search", json={"text": "grinning face", "k": 5})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert [h["id"] for h in body["hits"]] == [h.id for h in want]
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3, 4, 5]
    assert np.allclose([h["score"] for h in body["hits"]], [h.score for h in want], atol=1e-4)
    hit = body["hits"][0]
    assert hit["image_url"] == f"/v1/indexes/emoji/items/{hit['id']}/image"
    assert hit["metadata"]["filename"].endswith(".png") and "/" not in hit["metadata"]["filename"]
    assert body["took_ms"] >= 0 and body["query"] == "text" and body["index"] == "emoji"


def test_caption_modality_and_min_score(client):
    resp = client.post("/v1/search", json={"text": "flag", "k": 8, "modality": "text"})
    hits = resp.json()["hits"]
    assert len(hits) == 8 and all(h["caption"] for h in hits)
    cut = hits[3]["score"]
    kept = client.post("/v1/search", json={"text": "flag", "k": 8, "modality": "text", "min_score": cut}).json()["hits"]
    assert [h["id"] for h in kept] == [h["id"] for h in hits[:4]]


def test_image_query_json_and_multipart_find_the_same_item_first(client, rows):
    data = Path(rows[7].path).read_bytes()
    as_json = client.post("/v1/search", json={"image": base64.b64encode(data).decode(), "k": 3}).json()
    assert as_json["hits"][0]["id"] == rows[7].id and as_json["hits"][0]["score"] > 0.999
    upload = client.post(
        "/v1/search/image", files={"file": ("q.png", data, "image/png")}, data={"k": "3", "modality": "image"}
    )
    assert upload.status_code == 200, upload.text
    assert [h["id"] for h in upload.json()["hits"]] == [h["id"] for h in as_json["hits"]]


def test_more_like_this_by_id_leaves_out_the_item(client, rows):
    target = rows[10].id
    resp = client.post("/v1/search", json={"id": target, "k": 5}).json()
    ids = [h["id"] for h in resp["hits"]]
    assert len(ids) == 5 and target not in ids
    same = client.post(
        "/v1/search", json={"image": base64.b64encode(Path(rows[10].path).read_bytes()).decode(), "k": 6}
    )
    assert [h["id"] for h in same.json()["hits"]][1:] == ids
    assert client.post("/v1/search", json={"id": 10**9}).status_code == 404


def test_concurrent_text_queries_share_encoder_passes_and_get_their_own_results(serve_index, tiny_model):  # noqa: F811
    import asyncio

    import httpx

    from retriever.serve.app import ServeConfig, create_app

    texts = [f"emoji number {i}" for i in range(24)]
    r = Retriever(serve_index, tiny_model)
    want = {t: [h.id for h in r.search(text=t, k=1 + i % 5)] for i, t in enumerate(texts)}
    app = create_app(
        ServeConfig(indexes=[("emoji", serve_index)], model=tiny_model, watch_seconds=0, batch_window_ms=20)
    )

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            replies = await asyncio.gather(
                *[c.post("/v1/search", json={"text": t, "k": 1 + i % 5}) for i, t in enumerate(texts)]
            )
        return [x.json() for x in replies]

    replies = asyncio.run(main())
    for t, body in zip(texts, replies):
        assert [h["id"] for h in body["hits"]] == want[t]
    searcher = app.state.searcher
    assert searcher.texts == len(texts) and searcher.encoder_passes < len(texts) / 4


def test_vector_query(client, serve_index, tiny_model):  # noqa: F811
    from retriever.models.encode import encode_texts

    vec = encode_texts(tiny_model, ["a red apple"])[0]
    by_vec = client.post("/v1/search", json={"vector": (vec * 3).tolist(), "k": 4}).json()
    by_text = client.post("/v1/search", json={"text": "a red apple", "k": 4}).json()
    assert [h["id"] for h in by_vec["hits"]] == [h["id"] for h in by_text["hits"]]
    bad = client.post("/v1/search", json={"vector": [1.0, 2.0]})
    assert bad.status_code == 400 and "dimension" in bad.json()["error"]


def test_indexes_items_and_health(client, rows):
    listing = client.get("/v1/indexes").json()
    (idx,) = listing["indexes"]
    assert idx["name"] == "emoji" and idx["count"] == 64
    assert set(idx["modalities"]) == {"image", "text"} and idx["modalities"]["image"]["factory"]
    assert idx["model"]["name"]
    item = client.get(f"/v1/indexes/emoji/items/{rows[3].id}").json()
    assert item["id"] == rows[3].id and item["caption"] == rows[3].caption
    original = client.get(f"/v1/indexes/emoji/items/{rows[3].id}/image")
    assert original.status_code == 200 and original.content == Path(rows[3].path).read_bytes()
    thumb = client.get(f"/v1/indexes/emoji/items/{rows[3].id}/thumbnail?size=40")
    assert thumb.status_code == 200
    img = Image.open(io.BytesIO(thumb.content))
    assert max(img.size) == 40
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/v1/indexes/nope").status_code == 404
    assert client.get("/v1/indexes/emoji/items/999999").status_code == 404


def test_thumbnail_applies_exif_orientation(tmp_path):
    from retriever.serve.images import make_thumbnail

    img = Image.new("RGB", (80, 40), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    path = tmp_path / "rot.jpg"
    img.save(path, "JPEG", exif=exif)
    data, media = make_thumbnail(path, 64)
    assert media == "image/jpeg" and Image.open(io.BytesIO(data)).size == (32, 64)


def test_metrics_are_prometheus_text(client):
    client.post("/v1/search", json={"text": "cat", "k": 2})
    client.get("/v1/indexes/emoji/items/123456789")
    text = client.get("/metrics").text
    assert 'retriever_requests_total{method="POST",route="/v1/search",status="200"}' in text
    assert 'retriever_request_seconds_bucket{route="/v1/search",le="+Inf"}' in text
    assert 'retriever_index_vectors{index="emoji",modality="image"} 64' in text
    assert 'retriever_errors_total{route="/v1/indexes/{name}/items/{item_id}",kind="client"}' in text
    for line in text.splitlines():
        assert line.startswith("#") or " " in line


# ------------------------------------------------------------------ security


@pytest.mark.parametrize(
    "path",
    [
        "/v1/indexes/emoji/items/../../../../etc/passwd/image",
        "/v1/indexes/emoji/items/%2e%2e%2f%2e%2e%2fetc%2fpasswd/image",
        "/v1/indexes/emoji/items/%2Fetc%2Fpasswd/image",
        "/v1/indexes/..%2f..%2fetc/items/1/image",
        "/v1/indexes/emoji/items/-1/image",
        "/static/../../../../etc/passwd",
        "/static/%2e%2e/%2e%2e/app.py",
        "/static/..%2fapp.py",
        "//etc/passwd",
    ],
)
def test_no_request_names_a_file(client, path):
    resp = client.get(path)
    assert resp.status_code in (404, 422), (path, resp.status_code)
    assert "root:" not in resp.text and "def create_app" not in resp.text


def test_symlink_out_of_the_collection_is_not_served(tmp_path, tiny_model, emoji_items):
    from retriever.data.sources import read_source
    from retriever.embed import EmbedConfig, embed_items
    from retriever.indexes import build_index

    coll = tmp_path / "coll"
    coll.mkdir()
    for it in emoji_items[:4]:
        shutil.copy(it.path, coll / Path(it.path).name)
    secret = tmp_path / "secret.png"
    shutil.copy(emoji_items[5].path, secret)
    os.symlink(secret, coll / "link.png")
    embed_items(read_source(coll), tiny_model, tmp_path / "sh", EmbedConfig(num_workers=0))
    build_index(tmp_path / "sh", tmp_path / "idx")
    r = Retriever(tmp_path / "idx", tiny_model)
    link = next(h for h in r.lookup("image", np.arange(5)) if h.path.endswith("link.png"))
    with make_client(tmp_path / "idx", tiny_model, watch_seconds=0) as c:
        assert c.get(f"/v1/indexes/emoji/items/{link.id}/image").status_code == 404
        assert c.get(f"/v1/indexes/emoji/items/{link.id}/thumbnail").status_code == 404
        other = next(h for h in r.lookup("image", np.arange(5)) if not h.path.endswith("link.png"))
        assert c.get(f"/v1/indexes/emoji/items/{other.id}/image").status_code == 200


def test_api_key_bearer_and_page_cookie(serve_index, tiny_model):  # noqa: F811
    key = "k" * 20 + "secret"
    with make_client(serve_index, tiny_model, api_key=key, watch_seconds=0) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/").status_code == 200  # the page itself holds no data; it asks for the key
        for path in ("/v1/indexes", "/metrics", "/indices-list", "/openapi.json", "/docs"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"].startswith("This server needs an API key"), path
        assert c.post("/v1/search", json={"text": "x"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = c.post("/v1/search", json={"text": "x", "k": 1}, headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
        session = c.post("/v1/session", headers={"Authorization": f"Bearer {key}"})
        assert session.status_code == 200 and "httponly" in session.headers["set-cookie"].lower()
        assert key not in session.headers["set-cookie"]
        assert c.get("/v1/indexes").status_code == 200  # the cookie now rides along


def test_upload_cap_413_bombs_and_non_images_400(serve_index, tiny_model):  # noqa: F811
    with make_client(serve_index, tiny_model, max_upload=50_000, watch_seconds=0) as c:
        big = c.post("/v1/search/image", files={"file": ("big.png", b"\0" * 60_000, "image/png")})
        assert big.status_code == 413 and "upload limit" in big.json()["error"]

        def chunks():
            for _ in range(10):
                yield b"x" * 10_000

        streamed = c.post("/v1/search", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        text = c.post("/v1/search/image", files={"file": ("a.png", b"hello, not an image", "image/png")})
        assert text.status_code == 400 and text.json()["error"].startswith("The upload is not an image")
        buf = io.BytesIO()
        Image.new("1", (12000, 12000)).save(buf, "PNG")  # 144 Mpixel in a few KB
        bomb = c.post("/v1/search/image", files={"file": ("bomb.png", buf.getvalue(), "image/png")})
        assert bomb.status_code == 400 and "pixels" in bomb.json()["error"]
        assert c.post("/v1/search", json={"image": "!!notbase64"}).status_code == 400
        ok = c.post("/v1/search/image", files={"file": ("ok.png", png_bytes(), "image/png")})
        assert ok.status_code == 200


def test_k_cap_and_validation_are_422_in_one_sentence(client):
    from retriever.serve.query import MAX_K

    for body in (
        {"text": "x", "k": MAX_K + 1},
        {"text": "x", "k": 0},
        {"text": "x", "modality": "audio"},
        {"txt": "x"},
    ):
        r = client.post("/v1/search", json=body)
        assert r.status_code == 422, body
        assert isinstance(r.json()["error"], str) and "Traceback" not in r.text
    r = client.post("/v1/search/image", files={"file": ("ok.png", png_bytes(), "image/png")}, data={"k": "5000"})
    assert r.status_code == 422
    assert client.post("/v1/search", json={"k": 3}).status_code == 400  # no query at all
    assert (
        client.post("/v1/search", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    )


def test_cors_closed_by_default_and_open_to_named_origins(client, serve_index, tiny_model):  # noqa: F811
    pre = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    r = client.options("/knn-service", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    with make_client(serve_index, tiny_model, cors_origins=["http://localhost:1234"], watch_seconds=0) as c:
        ok = c.options("/knn-service", headers={**pre, "Origin": "http://localhost:1234"})
        assert ok.headers["access-control-allow-origin"] == "http://localhost:1234"
        no = c.options("/knn-service", headers=pre)
        assert no.headers.get("access-control-allow-origin") != "http://evil.example"


def test_errors_never_carry_stack_traces(client, monkeypatch):
    from retriever.serve import query

    def boom(*a, **k):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(query, "_text_batch", boom)
    r = client.post("/v1/search", json={"text": "x"})
    assert r.status_code == 500 and r.json() == {"error": "Internal error; the server log has the details."}
    monkeypatch.undo()
    assert client.post("/v1/search", json={"text": "x"}).status_code == 200  # still serving


# ------------------------------------------------------------------ reload


def test_reload_swaps_in_a_new_index_and_keeps_the_old_when_broken(tmp_path, serve_index, tiny_model, caplog):  # noqa: F811
    live = tmp_path / "live"
    shutil.copytree(serve_index, live)
    with make_client(live, tiny_model, watch_seconds=0) as c:
        old = c.post("/v1/search", json={"text": "star", "k": 3}).json()["hits"]
        # A rebuilt folder with fewer rows swapped in place (what `index --add` does, in reverse).
        from retriever.indexes.manifest import read_index_manifest

        m = read_index_manifest(live)
        shutil.rmtree(live)
        shutil.copytree(serve_index, live)
        (live / "manifest.json").write_text((live / "manifest.json").read_text().replace(m.created, m.created + " "))
        r = c.post("/v1/indexes/emoji/reload").json()
        assert r["reloaded"] and r["generation"] == 2
        assert c.post("/v1/search", json={"text": "star", "k": 3}).json()["hits"] == old
        # A broken folder: the old index keeps serving and the reason is logged.
        (live / "image.faiss").write_bytes(b"garbage")
        (live / "manifest.json").write_text((live / "manifest.json").read_text() + " ")
        with caplog.at_level("ERROR", logger="retriever.serve"):
            r = c.post("/v1/indexes/emoji/reload").json()
        assert not r["reloaded"] and "still serving the previous one" in r["message"]
        assert any("still serving" in rec.message for rec in caplog.records)
        assert c.post("/v1/search", json={"text": "star", "k": 3}).json()["hits"] == old


def test_watcher_notices_a_manifest_change(tmp_path, serve_index, tiny_model):  # noqa: F811
    import time

    live = tmp_path / "live"
    shutil.copytree(serve_index, live)
    with make_client(live, tiny_model, watch_seconds=0.05) as c:
        assert c.get("/v1/indexes/emoji").json()["generation"] == 1
        manifest = live / "manifest.json"
        tmp = live / "manifest.json.tmp"
        tmp.write_text(manifest.read_text())
        os.replace(tmp, manifest)  # a new inode, as an atomic rewrite makes
        deadline = time.monotonic() + 10
        while c.get("/v1/indexes/emoji").json()["generation"] == 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/v1/indexes/emoji").json()["generation"] == 2


def test_in_flight_query_finishes_on_the_old_index(serve_index, tiny_model):  # noqa: F811
    """A request holds its ServedIndex; a reload replaces the registry's entry, not the object."""
    from retriever.serve.state import ModelCache, Registry

    reg = Registry(ModelCache(tiny_model))
    old = reg.add("emoji", serve_index)
    reg.reload("emoji")
    new = reg.get("emoji")
    assert new is not old and new.generation == 2
    assert old.retriever.search_vectors(np.ones((1, old.retriever._index("image").d), np.float32), 3)[0]


# ------------------------------------------------------------------ the CLI against a running server


def test_cli_search_over_http_prints_the_same_results(serve_index, tiny_model, tmp_path):  # noqa: F811
    import json

    from live_server import live_server
    from typer.testing import CliRunner

    from retriever.cli.app import app
    from retriever.serve.app import ServeConfig, create_app

    key = "cli-test-key-0123456789"
    (tmp_path / "key").write_text(key + "\n")
    server_app = create_app(
        ServeConfig(indexes=[("emoji", serve_index)], model=tiny_model, watch_seconds=0, api_key=key)
    )
    want = Retriever(serve_index, tiny_model).search(text="red heart", k=4)
    runner = CliRunner()
    with live_server(server_app) as url:
        res = runner.invoke(
            app, ["search", url, "red heart", "-k", "4", "--json", "--api-key-file", str(tmp_path / "key")]
        )
        assert res.exit_code == 0, res.output
        got = json.loads(res.stdout)["hits"]  # the shape of a local search's --json
        assert [g["id"] for g in got] == [w.id for w in want]
        assert got[0]["path"].startswith(f"{url}/v1/indexes/emoji/items/")
        res = runner.invoke(
            app,
            [
                "search",
                str(serve_index),
                "red heart",
                "-k",
                "4",
                "--server",
                url,
                "--api-key-file",
                str(tmp_path / "key"),
            ],
        )
        assert res.exit_code == 0 and "rank" in res.stdout
        res = runner.invoke(app, ["search", f"{url}/v1/indexes/emoji", "red heart"])  # no key
        assert res.exit_code == 1 and "401" in res.output and "Traceback" not in res.output
    res = runner.invoke(app, ["search", url, "red heart"])  # the server is gone
    assert res.exit_code == 1 and "Could not reach" in res.output


def test_serve_command_options(tmp_path, serve_index):  # noqa: F811
    from retriever.cli.serve import parse_index_spec, parse_size, read_api_key
    from retriever.errors import UserError

    assert parse_size("20M") == 20 << 20 and parse_size("512k") == 512 << 10 and parse_size("100") == 100
    assert parse_index_spec(str(serve_index)) == ("emoji", serve_index)
    assert parse_index_spec(f"demo={serve_index}") == ("demo", serve_index)
    with pytest.raises(UserError):
        parse_index_spec(str(tmp_path / "missing"))
    (tmp_path / "short").write_text("abc")
    with pytest.raises(UserError, match="shorter than 16"):
        read_api_key(tmp_path / "short")


# ------------------------------------------------------------------ image URLs (SSRF)


def test_image_urls_are_refused_unless_allowed_and_then_never_private(serve_index, tiny_model, rows, monkeypatch):  # noqa: F811
    from live_server import live_server

    from retriever.serve import fetch
    from retriever.serve.app import ServeConfig, create_app

    with make_client(serve_index, tiny_model, watch_seconds=0) as c:
        r = c.post("/v1/search", json={"image_url": "http://example.com/a.png"})
        assert r.status_code == 400 and "does not fetch image URLs" in r.json()["error"]
    sizes = sorted(Path(h.path).stat().st_size for h in rows)
    cap = sizes[len(sizes) // 2]
    with make_client(serve_index, tiny_model, watch_seconds=0, allow_image_urls=True, max_upload=cap) as c:
        for url in (
            "http://127.0.0.1:8000/v1/indexes",
            "http://localhost/x.png",
            "http://10.1.2.3/x.png",
            "http://192.168.0.1/x.png",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/x.png",
            "http://0.0.0.0/x.png",
            "file:///etc/passwd",
            "ftp://example.com/x.png",
        ):
            r = c.post("/v1/search", json={"image_url": url})
            assert r.status_code == 400, url
            assert "private or local" in r.json()["error"] or "Only http and https" in r.json()["error"], url
        body = (
            b'{"image_url": "http://127.0.0.1:1/x.png", "modality": "image", "num_images": 3, "indice_name": "emoji"}'
        )
        assert "private or local" in c.post("/knn-service", content=body).json()["error"]
        # With the address check relaxed to reach a loopback test server: fetched, searched, size-capped.
        monkeypatch.setattr(fetch, "is_public", lambda ip: True)
        source = create_app(ServeConfig(indexes=[("emoji", serve_index)], model=tiny_model, watch_seconds=0))
        with live_server(source) as url:
            small = next(h for h in rows if Path(h.path).stat().st_size <= cap)
            r = c.post("/v1/search", json={"image_url": f"{url}/v1/indexes/emoji/items/{small.id}/image", "k": 1})
            assert r.status_code == 200 and r.json()["hits"][0]["id"] == small.id
            big = next(h for h in rows if Path(h.path).stat().st_size > cap)
            r = c.post("/v1/search", json={"image_url": f"{url}/v1/indexes/emoji/items/{big.id}/image"})
            assert r.status_code == 400 and "larger than" in r.json()["error"]
            r = c.post("/v1/search", json={"image_url": f"{url}/no-such-page"})
            assert r.status_code == 400 and "HTTP 404" in r.json()["error"]


def test_index_add_is_served_without_a_restart(tmp_path, tiny_model, emoji_items):
    import time

    from retriever.data.sources import read_source
    from retriever.embed import EmbedConfig, embed_items
    from retriever.indexes import build_index
    from retriever.indexes.add import add_to_index

    for name, part in (("a", emoji_items[:20]), ("b", emoji_items[20:30])):
        (tmp_path / name).mkdir()
        for it in part:
            shutil.copy(it.path, tmp_path / name / Path(it.path).name)
        embed_items(read_source(tmp_path / name), tiny_model, tmp_path / f"{name}.shards", EmbedConfig(num_workers=0))
    build_index(tmp_path / "a.shards", tmp_path / "idx")
    with make_client(tmp_path / "idx", tiny_model, watch_seconds=0.05) as c:
        assert c.get("/v1/indexes/emoji").json()["count"] == 20
        add_to_index(tmp_path / "idx", tmp_path / "b.shards", renumber=True)
        deadline = time.monotonic() + 20
        while c.get("/v1/indexes/emoji").json()["count"] == 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.get("/v1/indexes/emoji").json()["count"] == 30
        new = (tmp_path / "b" / Path(emoji_items[25].path).name).read_bytes()
        hit = c.post("/v1/search", json={"image": base64.b64encode(new).decode(), "k": 1}).json()["hits"][0]
        assert hit["score"] > 0.999 and c.get(hit["image_url"]).content == new
