"""clip-retrieval's own clients, run for real against `retriever serve` on 127.0.0.1.

clip-retrieval pins numpy<2, so it can never share our environment: each test runs only when an
environment variable points at a separate install, and otherwise skips with one line.
- RETRIEVER_CLIP_RETRIEVAL_PYTHON: a Python interpreter that can find the `clip_retrieval` package
  (`python3 -m venv V && V/bin/pip install --no-deps clip-retrieval requests`). Its clip_client.py is
  loaded from that package's folder without running the package's __init__, which imports the whole
  back end (torch, faiss, flask); ClipClient itself needs only requests.
- RETRIEVER_CLIP_FRONT_DIR: the front's built static files (index.html, main.*.js, assets/), e.g. the
  `front/build` folder that the clip-retrieval wheel installs into site-packages. Needs playwright and
  Chromium, like serve/test_serve_browser.py.
The replays in serve/test_serve_compat.py pin the same requests byte for byte and always run.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from live_server import live_server
from serve_fixtures import serve_index  # noqa: F401 (fixture)

from retriever.search import Retriever

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CLIP_PYTHON = os.environ.get("RETRIEVER_CLIP_RETRIEVAL_PYTHON")
FRONT_DIR = os.environ.get("RETRIEVER_CLIP_FRONT_DIR")
CHROMIUM = os.environ.get("RETRIEVER_CHROMIUM", "/usr/bin/chromium")

# Runs in clip-retrieval's interpreter: the real ClipClient, every query kind and option, results as JSON.
CLIP_CLIENT_SCRIPT = r"""
import importlib.util, json, pathlib, sys
spec = importlib.util.find_spec("clip_retrieval")
path = pathlib.Path(spec.submodule_search_locations[0]) / "clip_client.py"
module_spec = importlib.util.spec_from_file_location("clip_client", path)
cc = importlib.util.module_from_spec(module_spec)
module_spec.loader.exec_module(cc)
url, image, vector = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
images = cc.ClipClient(url=url, indice_name="emoji", num_images=5)  # defaults: dedup, safety, aesthetic
captions = cc.ClipClient(
    url=url, indice_name="emoji", modality=cc.Modality.TEXT, num_images=3, deduplicate=False,
    use_safety_model=False, use_violence_detector=False, aesthetic_score=5, aesthetic_weight=0.1, use_mclip=True,
)
print(json.dumps({
    "text": images.query(text="grinning face"),
    "image": images.query(image=image),
    "embedding": images.query(embedding_input=vector),
    "captions": captions.query(text="flag"),
    "wrong_dim": images.query(embedding_input=vector[:3]),
    "missing_index": cc.ClipClient(url=url, indice_name="laion5B").query(text="x"),
    "all": cc.ClipClient(url=url, indice_name="emoji", num_images=1000, deduplicate=False).query(text="a"),
}))
"""


def clip_python_reason() -> str | None:
    if not CLIP_PYTHON:
        return "set RETRIEVER_CLIP_RETRIEVAL_PYTHON to a Python with clip-retrieval installed (it pins numpy<2)"
    try:
        found = subprocess.run(
            [CLIP_PYTHON, "-c", "import importlib.util, requests; assert importlib.util.find_spec('clip_retrieval')"],
            capture_output=True,
            timeout=60,
        )
    except OSError as e:
        return f"RETRIEVER_CLIP_RETRIEVAL_PYTHON={CLIP_PYTHON} cannot run: {e}"
    if found.returncode != 0:
        return f"{CLIP_PYTHON} cannot import clip_retrieval and requests"
    return None


@pytest.fixture(scope="module")
def server(serve_index, tiny_model):  # noqa: F811
    from retriever.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(indexes=[("emoji", serve_index)], model=tiny_model, watch_seconds=0))
    with live_server(app) as url:
        yield url


def test_real_clip_client_against_the_server(server, serve_index, tiny_model):  # noqa: F811
    reason = clip_python_reason()
    if reason:
        pytest.skip(reason)
    from retriever.models.encode import encode_texts

    r = Retriever(serve_index, tiny_model)
    item = r.lookup("image", np.array([12]))[0]
    vector = encode_texts(tiny_model, ["dog"])[0].tolist()
    run = subprocess.run(
        [CLIP_PYTHON, "-c", CLIP_CLIENT_SCRIPT, f"{server}/knn-service", item.path, json.dumps(vector)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout)

    text = got["text"]
    assert 1 <= len(text) <= 5 and {"id", "similarity", "url", "caption"} <= set(text[0])
    want = r.search(text="grinning face", k=5)
    assert text[0]["id"] == want[0].id and abs(text[0]["similarity"] - want[0].score) < 1e-4
    assert text[0]["url"] == f"{server}/v1/indexes/emoji/items/{text[0]['id']}/image"
    assert got["image"][0]["id"] == item.id and got["image"][0]["similarity"] > 0.999
    assert got["embedding"][0]["id"] == r.search(text="dog", k=1)[0].id
    assert len(got["captions"]) == 3 and all(isinstance(h["caption"], str) for h in got["captions"])
    assert got["captions"][0]["id"] == r.search(text="flag", k=1, modality="text")[0].id
    assert "must have" in got["wrong_dim"]["error"]
    assert "laion5B" in got["missing_index"]["error"]
    assert len(got["all"]) == r.manifest.indexes["image"].count  # num_images past the index: every item once


@contextmanager
def static_server(folder: Path):
    """The front's files on 127.0.0.1 (a free port), as `python -m http.server` serves them."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join(timeout=10)


def front_reason() -> str | None:
    if not FRONT_DIR:
        return "set RETRIEVER_CLIP_FRONT_DIR to clip-retrieval's built front (its wheel's front/build)"
    if not (Path(FRONT_DIR) / "index.html").is_file():
        return f"RETRIEVER_CLIP_FRONT_DIR={FRONT_DIR} has no index.html"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed"
    if not Path(CHROMIUM).is_file():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    return None


PICS = "() => [...document.querySelector('clip-front').shadowRoot.querySelectorAll('img.pic')]"
LOADED = f"n => {{ const im = ({PICS})(); return im.length >= n && im.slice(0, n).every(i => i.complete && i.naturalWidth > 0); }}"


def test_real_clip_front_against_the_server(serve_index, tiny_model, tmp_path):  # noqa: F811
    """The front on its own origin, pointed at the server by ?back=: a typed query's images load, its
    "similar" button searches with a hit, and an uploaded file searches by image."""
    reason = front_reason()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    from retriever.serve.app import ServeConfig, create_app

    r = Retriever(serve_index, tiny_model)
    with static_server(Path(FRONT_DIR)) as front:
        config = ServeConfig(indexes=[("emoji", serve_index)], model=tiny_model, watch_seconds=0, cors_origins=[front])
        with live_server(create_app(config)) as back, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{front}/index.html?back={back}&index=emoji")
            bar = page.locator("clip-front").locator("#searchBar")
            # The tiny random model puts many images within clip_back's 0.94 cosine of each other:
            # untick "Hide (near) duplicate images" (the 7th checkbox) so the grid has more than a few.
            page.locator("clip-front").locator("input[type=checkbox]").nth(6).uncheck()
            bar.fill("grinning face")
            bar.press("Enter")
            page.wait_for_function(LOADED, arg=8, timeout=30_000)
            pics = page.evaluate(f"() => ({PICS})().map(i => [i.src, i.title, i.naturalWidth])")
            want = r.search(text="grinning face", k=1)[0]
            assert pics[0][0] == f"{back}/v1/indexes/emoji/items/{want.id}/image" and pics[0][2] > 0
            assert pics[0][1] == want.caption
            page.screenshot(path=str(tmp_path / "clip-front.png"))

            target = pics[5][0]
            figure = page.locator("clip-front").locator("figure").nth(5)
            figure.hover()
            figure.locator(".subImageSearch").click()  # "similar": posts the hit's url as image_url
            page.wait_for_function(
                f"src => {{ const im = ({PICS})(); return im.length > 0 && im[0].src === src && im[0].naturalWidth > 0; }}",
                arg=target,
                timeout=30_000,
            )
            assert "imageUrl=" in page.url

            upload = r.lookup("image", np.array([20]))[0]
            page.locator("clip-front").locator("#filechooser").set_input_files(upload.path)
            page.wait_for_function(
                f"src => ({PICS})()[0]?.src === src",
                arg=f"{back}/v1/indexes/emoji/items/{upload.id}/image",
                timeout=30_000,
            )
            browser.close()
