"""Querybank normalisation (retriever.querybank): the bank file, the bias, and what an index built
from a model with a bank does with it (build, search, --add, parts)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest
import torch

from retriever.identity import ModelIdentity
from retriever.indexes import build_index
from retriever.indexes.add import add_to_index
from retriever.indexes.config import BuildConfig
from retriever.indexes.rows import RowsFile
from retriever.metrics import retrieval_metrics
from retriever.querybank import BANK_FILE, BIAS_COLUMN, QueryBank, hub_bias, read_querybank, write_querybank
from retriever.search import Retriever
from retriever.shards import shard_name, shard_schema, write_shard

D = 16
SHA = hashlib.sha256(b"querybank test model").hexdigest()


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def make_bank(rng, tau: float = 0.1) -> QueryBank:
    """Captions that cluster around one direction (so images near it are hubs), images anywhere."""
    common = unit(np.ones(D))
    text = unit(rng.standard_normal((300, D)) * 0.5 + 2 * common)
    return QueryBank(text, unit(rng.standard_normal((200, D))), tau, SHA)


def write_shards(folder, model_dir, image, text, first_id=0):
    identity = ModelIdentity(f"local-dir:{model_dir}", None, SHA, D)
    schema = shard_schema(identity, metadata_fields=[pa.field("colour", pa.string())])
    n = len(image)
    ids = list(range(first_id, first_id + n))
    has_text = np.array([i % 2 == 0 for i in ids])  # every other row has a caption
    write_shard(
        folder / shard_name(0),
        schema,
        ids,
        [f"img/{i}.png" for i in ids],
        [f"caption {i}" if t else None for i, t in zip(ids, has_text)],
        image,
        np.where(has_text[:, None], text, 0).astype(np.float32),
        has_text,
        [{"colour": "red" if i % 3 else "blue"} for i in ids],
    )
    return folder


@pytest.fixture
def qb_index(tmp_path):
    rng = np.random.default_rng(0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    bank = make_bank(rng)
    write_querybank(model_dir, bank)
    image = unit(rng.standard_normal((300, D)))
    image[:5] = unit(image[:5] * 0.3 + unit(np.ones(D)))  # five hubs: near every caption
    text = unit(image + 0.3 * rng.standard_normal(image.shape))
    shards = write_shards(tmp_path / "shards", model_dir, image, text)
    build_index(shards, tmp_path / "index", BuildConfig(index_type="flat"))
    return tmp_path, read_querybank(model_dir), image, text, rng


def test_hub_bias_is_minus_tau_logsumexp_and_the_bank_file_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    bank = make_bank(rng, tau=0.07)
    g = unit(rng.standard_normal((50, D)))
    want = -0.07 * torch.logsumexp(torch.from_numpy(g @ bank.text.T).double() / 0.07, dim=1).numpy()
    np.testing.assert_allclose(hub_bias(g, bank.text, 0.07, chunk=7), want, rtol=0, atol=1e-5)

    write_querybank(tmp_path, bank)
    back = read_querybank(tmp_path, SHA)
    assert back is not None and back.tau == 0.07 and back.text.shape == bank.text.shape
    np.testing.assert_allclose(back.text, bank.text, atol=1e-3)  # stored as float16
    assert read_querybank(tmp_path, "0" * 64) is None  # another model's bank is not this one's
    (tmp_path / BANK_FILE).write_bytes(b"torn")
    assert read_querybank(tmp_path) is None
    assert read_querybank(tmp_path / "absent") is None


def test_metrics_with_a_querybank_demote_a_hub():
    """Caption j belongs to image j, but image 0 is nearer every caption than its own image is:
    plain cosine ranks the hub first for every query; the bank's bias puts each own image first."""
    rng = np.random.default_rng(2)
    own = unit(rng.standard_normal((20, D)))
    hub = unit(own.sum(axis=0))
    images = np.concatenate([hub[None], own])
    captions = unit(0.5 * own + 0.8 * hub)
    plain = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(captions), list(range(1, 21)))
    bank = QueryBank(captions, images, 0.05, SHA)
    qb = retrieval_metrics(torch.from_numpy(images), torch.from_numpy(captions), list(range(1, 21)), querybank=bank)
    assert plain.text_to_image.recall[1] < 0.5
    assert qb.text_to_image.recall[1] > plain.text_to_image.recall[1]


def test_index_stores_the_bias_and_cross_modal_search_ranks_by_it_exactly(qb_index):
    tmp_path, bank, image, text, rng = qb_index
    index_dir = tmp_path / "index"
    assert (index_dir / BANK_FILE).is_file()
    rows = RowsFile(index_dir / "image.rows.arrow")
    np.testing.assert_allclose(rows.float_column(BIAS_COLUMN), bank.bias(image, "image"), atol=1e-5)
    rows.close()

    queries = unit(rng.standard_normal((40, D)) * 0.4 + unit(np.ones(D)))
    want_bias = bank.bias(image, "image")
    with Retriever(index_dir) as r:
        assert r._opened("image").entry.extra["querybank"]["tau"] == pytest.approx(0.1)
        assert BIAS_COLUMN not in r.columns("image")
        qb = r.search_vectors(queries, 10, "image", query_modality="text")
        plain = r.search_vectors(queries, 10, "image")
        same_modality = r.search_vectors(queries, 10, "image", query_modality="image")
    moved = 0
    for qi, q in enumerate(queries):
        cos = image @ q
        assert [h.id for h in qb[qi]] == np.argsort(-(cos + want_bias), kind="stable")[:10].tolist()
        assert [h.id for h in plain[qi]] == np.argsort(-cos, kind="stable")[:10].tolist()
        assert [h.id for h in same_modality[qi]] == [h.id for h in plain[qi]]
        np.testing.assert_allclose([h.score for h in qb[qi]], cos[[h.id for h in qb[qi]]], atol=1e-5)  # cosine
        assert BIAS_COLUMN not in qb[qi][0].metadata and "colour" in qb[qi][0].metadata
        assert qb[qi].report.extra["querybank_tau"] == pytest.approx(0.1)
        moved += [h.id for h in qb[qi]] != [h.id for h in plain[qi]]
    assert moved > 10  # the hubs (ids 0-4) crowd the plain lists
    assert sum(h.id < 5 for hits in qb for h in hits) < sum(h.id < 5 for hits in plain for h in hits)

    # image→text: caption rows are biased with the bank's images
    text_ids = np.arange(0, 300, 2)
    with Retriever(index_dir) as r:
        hits = r.search_vectors(image[:10], 5, "text", query_modality="image")
    caption_bias = bank.bias(text[text_ids], "text")
    for qi in range(10):
        score = text[text_ids] @ image[qi] + caption_bias
        assert [h.id for h in hits[qi]] == text_ids[np.argsort(-score, kind="stable")[:5]].tolist()

    with Retriever(index_dir, querybank=False) as r:
        off = r.search_vectors(queries, 10, "image", query_modality="text")
    assert [[h.id for h in hits] for hits in off] == [[h.id for h in hits] for hits in plain]

    # an index holding a bank is still recognised as one: a rebuild replaces it
    build_index(tmp_path / "shards", index_dir, BuildConfig(index_type="flat"))
    assert (index_dir / BANK_FILE).is_file()


def test_filtered_and_id_queries_use_the_bias_where_the_query_is_cross_modal(qb_index):
    tmp_path, bank, image, text, rng = qb_index
    q = unit(rng.standard_normal((1, D)) * 0.4 + unit(np.ones(D)))
    blue = np.array([i % 3 == 0 for i in range(300)])
    with Retriever(tmp_path / "index") as r:
        hits = r.search_vectors(q, 5, "image", where="colour = 'blue'", query_modality="text")[0]
        # id:1 has no caption: on the text index it is its image vector, so the search is cross-modal
        cross = r.search("id:1", modality="text", k=5)
        # id:2 has a caption: its text vector searches the text index, no bias
        same = r.search("id:2", modality="text", k=5, keep_query=True)
    score = np.where(blue, image @ q[0] + bank.bias(image, "image"), -np.inf)
    assert [h.id for h in hits] == np.argsort(-score, kind="stable")[:5].tolist()
    assert hits.report.extra["querybank_candidates"] >= 5
    with Retriever(tmp_path / "index") as r:  # a filter nothing matches: no hits, no error
        assert list(r.search_vectors(q, 5, "image", where="colour = 'green'", query_modality="text")[0]) == []
    assert cross.report.extra.get("querybank_tau") == pytest.approx(0.1)
    assert "querybank_tau" not in same.report.extra
    assert same[0].id == 2


def test_add_biases_new_rows_with_the_index_bank_and_refuses_without_it(qb_index):
    tmp_path, bank, image, text, rng = qb_index
    new_image = unit(rng.standard_normal((40, D)))
    new = write_shards(tmp_path / "new", tmp_path / "model", new_image, new_image, first_id=1000)
    (tmp_path / "model" / BANK_FILE).unlink()  # the index keeps its own copy
    add_to_index(tmp_path / "index", new)
    rows = RowsFile(tmp_path / "index" / "image.rows.arrow")
    bias = rows.float_column(BIAS_COLUMN)
    rows.close()
    assert len(bias) == 340
    np.testing.assert_allclose(bias[300:], bank.bias(new_image, "image"), atol=1e-5)

    more = write_shards(tmp_path / "more", tmp_path / "model", new_image[:5], new_image[:5], first_id=2000)
    (tmp_path / "index" / BANK_FILE).unlink()
    with pytest.raises(Exception, match="querybank"):
        add_to_index(tmp_path / "index", more)


def test_no_querybank_build_and_a_model_without_a_bank_index_plainly(qb_index):
    tmp_path, bank, image, text, rng = qb_index
    build_index(tmp_path / "shards", tmp_path / "plain", BuildConfig(index_type="flat", querybank=False))
    assert not (tmp_path / "plain" / BANK_FILE).exists()
    with Retriever(tmp_path / "plain") as r:
        assert not r._opened("image").has_querybank
        hits = r.search_vectors(image[:1], 3, "image", query_modality="text")[0]
    assert "querybank_tau" not in hits.report.extra

    write_querybank(tmp_path / "model", QueryBank(bank.text, bank.image, 0.1, "f" * 64))  # retrained weights
    build_index(tmp_path / "shards", tmp_path / "stale", BuildConfig(index_type="flat"))
    assert not (tmp_path / "stale" / BANK_FILE).exists()


def test_a_partitioned_build_carries_the_bias_like_a_one_process_build(qb_index):
    from retriever.indexes.partitioned import build_part, merge_parts

    tmp_path, bank, image, text, rng = qb_index
    cfg = BuildConfig(index_type="ivf", on_disk=True)
    out = tmp_path / "parted"
    build_part(tmp_path / "shards", out, 0, 1, cfg)
    merge_parts(out)
    assert (out / BANK_FILE).is_file()
    rows = RowsFile(out / "image.rows.arrow")
    np.testing.assert_allclose(rows.float_column(BIAS_COLUMN), bank.bias(image, "image"), atol=1e-5)
    rows.close()
