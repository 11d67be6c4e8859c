"""A server over an index built from a model folder with a querybank answers text→image and
image→text as the library does (querybank ranking), and image→image by cosine."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from serve_fixtures import make_client

from retriever.data.sources import read_source
from retriever.embed import EmbedConfig, embed_items
from retriever.indexes import build_index
from retriever.models.folder import write_model_files
from retriever.models.load import load_model
from retriever.querybank import QueryBank, write_querybank
from retriever.search import Retriever


@pytest.fixture(scope="module")
def qb_served(tmp_path_factory, tiny_model, emoji_folder):
    """The tiny model saved as a local-dir folder with a bank whose captions all sit near a few
    images (hubs), and an index of the 64 emoji built from it."""
    folder = tmp_path_factory.mktemp("qb-model")
    write_model_files(folder, tiny_model.model, tiny_model.config)
    model = load_model(f"local-dir:{folder}")
    shards = tmp_path_factory.mktemp("qb-shards")
    embed_items(read_source(emoji_folder), model, shards, EmbedConfig(shard_size=32, num_workers=0))
    with Retriever(_index(shards, tmp_path_factory)) as r:  # no bank yet: image vectors as they are
        image = r._opened("image").vectors(np.arange(64))
    rng = np.random.default_rng(0)
    hubs = image[:4].mean(axis=0)
    text = hubs + 0.3 * rng.standard_normal((200, image.shape[1])).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    write_querybank(folder, QueryBank(text, image, 0.05, model.identity.weights_sha256))
    index = _index(shards, tmp_path_factory)
    assert (index / "querybank.safetensors").is_file()
    return model, index, emoji_folder


def _index(shards: Path, factory) -> Path:
    out = factory.mktemp("qb-idx") / "emoji"
    build_index(shards, out)
    return out


def test_served_text_and_image_queries_rank_like_the_library(qb_served):
    model, index, emoji_folder = qb_served
    png = next(emoji_folder.rglob("*.png"))
    with Retriever(index, model) as r, Retriever(index, model, querybank=False) as plain:
        want = {q: [h.id for h in r.search(text=q, k=8)] for q in ("grinning face", "flag", "a red heart")}
        cosine = {q: [h.id for h in plain.search(text=q, k=8)] for q in want}
        want_i2t = [h.id for h in r.search(image=png, k=5, modality="text")]
        want_i2i = [h.id for h in plain.search(image=png, k=5, modality="image", keep_query=True)]
    assert want != cosine  # the bank moves hits
    with make_client(index, model, watch_seconds=0) as c:
        for q, ids in want.items():
            assert [h["id"] for h in c.post("/v1/search", json={"text": q, "k": 8}).json()["hits"]] == ids
        data = base64.b64encode(png.read_bytes()).decode()
        i2t = c.post("/v1/search", json={"image": data, "k": 5, "modality": "text"}).json()["hits"]
        i2i = c.post("/v1/search", json={"image": data, "k": 5, "modality": "image"}).json()["hits"]
    assert [h["id"] for h in i2t] == want_i2t
    assert [h["id"] for h in i2i] == want_i2i  # image→image: cosine, the bank is not used


def test_the_front_similar_button_on_captions_ranks_as_an_image_query(qb_served):
    """clip-retrieval's front sends a hit's url back as image_url: the server searches with that
    item's stored image vector, so asking for captions is image→text and uses the querybank."""
    import json

    model, index, _ = qb_served
    with Retriever(index, model) as r:
        vec = r._opened("image").vectors(np.array([7]))
        want = [h.id for h in r.search_vectors(vec, 5, "text", query_modality="image")[0]]
    body = {"text": "", "image": None, "embedding_input": None, "modality": "text", "num_images": 5}
    body.update(indice_name="emoji", num_result_ids=5, deduplicate=False, use_mclip=False)
    with make_client(index, model, watch_seconds=0) as c:
        url = "http://testserver/v1/indexes/emoji/items/7/image"  # a hit's url, as /knn-service gives it
        got = c.post("/knn-service", content=json.dumps({**body, "image_url": url}))
    assert got.status_code == 200, got.text
    assert [h["id"] for h in got.json()] == want
