"""Fixtures shared by the server tests: a small index from the tiny model over Twemoji."""

from __future__ import annotations

import pytest

from retriever.data.sources import read_source
from retriever.embed import EmbedConfig, embed_items
from retriever.indexes import build_index


@pytest.fixture(scope="session")
def serve_index(tmp_path_factory, tiny_model, emoji_folder):
    """A flat index (image + text) over the 64 conftest emoji, in a folder named `emoji`."""
    shards = tmp_path_factory.mktemp("serve-shards")
    embed_items(read_source(emoji_folder), tiny_model, shards, EmbedConfig(shard_size=32, num_workers=0))
    out = tmp_path_factory.mktemp("serve-idx") / "emoji"
    build_index(shards, out)
    return out


def make_client(index_dir, tiny_model, **config):
    from fastapi.testclient import TestClient

    from retriever.serve.app import ServeConfig, create_app

    app = create_app(ServeConfig(indexes=[("emoji", index_dir)], model=tiny_model, **config))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(serve_index, tiny_model):
    """A test client of a server over `serve_index` (no manifest watching), one per test module."""
    with make_client(serve_index, tiny_model, watch_seconds=0) as c:
        yield c
