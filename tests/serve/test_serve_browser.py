"""The web page in a real browser: Debian's headless Chromium driven by playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from live_server import live_server
from serve_fixtures import serve_index  # noqa: F401 (fixture)

CHROMIUM = os.environ.get("RETRIEVER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run"]  # fmt: skip

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(sync_playwright is None, reason="the playwright package is not installed"),
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"),
    pytest.mark.usefixtures("one_torch_thread"),
]

K = 8


@pytest.fixture(scope="module")
def server(serve_index, tiny_model):  # noqa: F811
    from retriever.serve.app import ServeConfig, create_app

    app = create_app(
        ServeConfig(indexes=[("emoji", serve_index)], model=tiny_model, watch_seconds=0, max_upload=200_000)
    )
    with live_server(app) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    yield pg
    context.close()


def artifact_dir(tmp_path) -> Path:
    out = Path(os.environ.get("RETRIEVER_TEST_ARTIFACTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def wait_for_results(page, n=K):
    expect(page.locator("#results li")).to_have_count(n, timeout=20_000)
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)",
        timeout=20_000,
    )


def hit_ids(page) -> list[int]:
    return [int(x) for x in page.locator("#results .hit").evaluate_all("els => els.map(e => e.dataset.id)")]


def test_text_query_loads_k_images_then_more_like_this_and_back(page, server, tmp_path):
    page.goto(f"{server}/?k={K}")
    page.fill("#q", "grinning face")
    page.press("#q", "Enter")
    wait_for_results(page)
    assert "q=grinning+face" in page.url and f"k={K}" in page.url
    first = hit_ids(page)
    assert page.locator("#results .score").first.inner_text().startswith(("0.", "-0.", "1."))
    page.screenshot(path=str(artifact_dir(tmp_path) / "serve-results.png"), full_page=True)

    clicked = first[2]
    page.locator("#results .hit").nth(2).click()
    page.wait_for_url(f"**id={clicked}**")
    # The URL changes before the new grid replaces the old one (same count, images loaded): wait for
    # the clicked item to leave the grid, which it must (an item is left out of its own neighbours).
    page.wait_for_function(
        "id => ![...document.querySelectorAll('#results .hit')].some(e => e.dataset.id === id)",
        arg=str(clicked),
        timeout=20_000,
    )
    wait_for_results(page)
    assert clicked not in hit_ids(page)

    page.go_back()  # the back button restores the text query and its results
    page.wait_for_url("**q=grinning+face**")
    # As above, the URL changes before the grid does: wait for the text query's grid to come back.
    page.wait_for_function(
        "ids => [...document.querySelectorAll('#results .hit')].map(e => e.dataset.id).join() === ids",
        arg=",".join(map(str, first)),
        timeout=20_000,
    )
    wait_for_results(page)
    assert hit_ids(page) == first
    assert page.input_value("#q") == "grinning face"


def test_modality_switch_and_shareable_link(page, server):
    page.goto(f"{server}/?q=flag&k={K}&modality=text")
    wait_for_results(page)
    assert page.is_checked("input[name=modality][value=text]")
    captions = page.locator("#results .caption").all_inner_texts()
    assert all(c.strip() for c in captions)
    page.check("input[name=modality][value=image]")
    page.wait_for_url("**modality=image**")
    wait_for_results(page)


def test_upload_button_drop_and_paste_find_the_image_itself(page, server, serve_index, tiny_model):  # noqa: F811
    from retriever.search import Retriever

    item = Retriever(serve_index, tiny_model).lookup("image", np.array([5]))[0]
    page.goto(f"{server}/?k={K}")
    expect(page.locator("#index option")).to_have_count(1)
    page.set_input_files("#file", item.path)
    wait_for_results(page)
    assert hit_ids(page)[0] == item.id
    assert float(page.locator("#results .score").first.inner_text()) > 0.99

    other = Retriever(serve_index, tiny_model).lookup("image", np.array([9]))[0]
    for event in ("drop", "paste"):
        page.goto(f"{server}/?k={K}")
        expect(page.locator("#index option")).to_have_count(1)
        page.evaluate(
            """async ([url, kind]) => {
                const blob = await (await fetch(url)).blob();
                const dt = new DataTransfer();
                dt.items.add(new File([blob], 'q.png', { type: 'image/png' }));
                const ev = kind === 'drop'
                  ? new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true })
                  : new ClipboardEvent('paste', { clipboardData: dt, bubbles: true, cancelable: true });
                document.body.dispatchEvent(ev);
            }""",
            [f"{server}/v1/indexes/emoji/items/{other.id}/image", event],
        )
        wait_for_results(page)
        assert hit_ids(page)[0] == other.id, event


def test_refine_more_like_this_and_an_upload_with_where_dedup_and_but_not(page, server, serve_index, tiny_model):  # noqa: F811
    """The query language from the page: "where", "fold duplicates" and "and / but not" text next to
    a more-like-this item or an uploaded image give the library's own hits, and live in the URL."""
    from retriever.query import Query
    from retriever.search import Retriever

    r = Retriever(serve_index, tiny_model)
    page.goto(f"{server}/?q=flag&k={K}")
    wait_for_results(page)
    clicked = hit_ids(page)[1]
    page.locator("#results .hit").nth(1).click()
    page.wait_for_url(f"**id={clicked}**")
    expect(page.locator("#query-image")).to_be_visible()  # the item beside the refine fields
    page.fill("#where", "dir = 'group1'")
    page.fill("#not", "a red heart")
    page.fill("#dedup", "0.99")
    page.press("#where", "Enter")
    page.wait_for_url("**where=**")
    assert "not=a+red+heart" in page.url and "dedup=0.99" in page.url and f"id={clicked}" in page.url
    want = r.search(Query.from_dict({"id": clicked, "terms": [{"text": "a red heart", "negative": True}],
                                     "where": "dir = 'group1'", "dedup": 0.99, "k": K}))  # fmt: skip
    page.wait_for_function(
        "ids => [...document.querySelectorAll('#results .hit')].map(e => e.dataset.id).join() === ids",
        arg=",".join(str(h.id) for h in want),
        timeout=20_000,
    )
    expect(page.locator("#status")).to_contain_text("items match the filter")
    rows = {h.id: h for h in r.lookup("image", np.arange(r.manifest.indexes["image"].count))}
    assert all(rows[i].metadata["dir"] == "group1" for i in hit_ids(page))

    page.go_back()  # the refine fields come back out of the URL too
    page.wait_for_url(lambda url: "where=" not in url)
    assert page.input_value("#where") == ""
    page.go_forward()
    page.wait_for_url("**where=**")
    assert page.input_value("#where") == "dir = 'group1'" and page.input_value("#not") == "a red heart"

    item = r.lookup("image", np.array([7]))[0]
    page.goto(f"{server}/?k={K}&and=a+flag")
    expect(page.locator("#index option")).to_have_count(1)
    assert page.input_value("#and") == "a flag"
    page.set_input_files("#file", item.path)  # sent with the form fields text=a flag
    want = r.search(Query.from_dict({"image": item.path, "terms": [{"text": "a flag"}], "k": K}))
    page.wait_for_function(
        "ids => [...document.querySelectorAll('#results .hit')].map(e => e.dataset.id).join() === ids",
        arg=",".join(str(h.id) for h in want),
        timeout=20_000,
    )
    wait_for_results(page)
    expect(page.locator("#query-words")).to_contain_text("and “a flag”")


def test_errors_show_inline_in_one_sentence(page, server, tmp_path):
    page.goto(f"{server}/?k={K}")
    bad = tmp_path / "notes.png"
    bad.write_text("this is text, not a picture")
    page.set_input_files("#file", str(bad))
    expect(page.locator("#error")).to_contain_text("not an image", timeout=20_000)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\0" * 300_000)
    page.set_input_files("#file", str(big))
    expect(page.locator("#error")).to_contain_text("upload limit", timeout=20_000)
    page.goto(f"{server}/?q=x&index=nope")  # an unknown index in a shared link: said, then the first one
    wait_for_results(page, n=24)
    assert page.input_value("#index") == "emoji"
    expect(page.locator("#error")).to_have_text("This server has no index named nope; searching emoji instead.")


def test_keyboard_only(page, server):
    page.goto(f"{server}/?k={K}")
    page.locator("body").click()
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("smiling face")
    page.keyboard.press("Enter")
    wait_for_results(page)
    page.locator("#results .hit").first.focus()
    first = hit_ids(page)[0]
    page.keyboard.press("Enter")
    page.wait_for_url(f"**id={first}**")
    wait_for_results(page)


def test_api_key_is_asked_once(browser, serve_index, tiny_model):  # noqa: F811
    from retriever.serve.app import ServeConfig, create_app

    key = "a-long-random-test-key-123"
    app = create_app(ServeConfig(indexes=[("emoji", serve_index)], model=tiny_model, watch_seconds=0, api_key=key))
    context = browser.new_context()
    page = context.new_page()
    with live_server(app) as url:
        page.goto(f"{url}/?q=cat&k={K}")
        expect(page.locator("#key-form")).to_be_visible(timeout=20_000)
        page.fill("#key", key)
        page.press("#key", "Enter")
        wait_for_results(page)
        page.reload()  # the session cookie carries on: no second prompt
        wait_for_results(page)
        assert page.locator("#key-form").is_hidden()
    context.close()


def test_live_socket_clip_client_request(server):
    """ClipClient's exact call shape over a real socket: requests.post(url, data=json.dumps(...))."""
    import json

    requests = pytest.importorskip("requests")
    body = {"text": "cat", "image": None, "image_url": None, "embedding_input": None, "deduplicate": True,
            "use_safety_model": True, "use_violence_detector": True, "indice_name": "emoji", "use_mclip": False,
            "aesthetic_score": 9, "aesthetic_weight": 0.5, "modality": "image", "num_images": 4,
            "num_result_ids": 4}  # fmt: skip
    hits = requests.post(f"{server}/knn-service", data=json.dumps(body), timeout=60).json()
    assert hits and all(h["url"].startswith(server) for h in hits)
    assert requests.get(hits[0]["url"], timeout=60).status_code == 200


_ = shutil  # keep the import for readers copying the fixture pattern
