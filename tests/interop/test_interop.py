"""clip-retrieval folders ⇄ shards: round trips, and misaligned folders refused before any write."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from retriever.cli.app import app
from retriever.data.sources import read_source
from retriever.embed import EmbedConfig, embed_items
from retriever.errors import UserError
from retriever.interop.clip_retrieval import export_clip_retrieval, import_clip_retrieval
from retriever.shards import ShardSet

runner = CliRunner()


def _rows(folder):
    t = pq.read_table(folder, columns=["id", "path", "caption", "image_embedding", "text_embedding"]).sort_by("id")
    return t.to_pydict()


@pytest.fixture(scope="module")
def shards(tmp_path_factory, emoji_items, tiny_model):
    tmp = tmp_path_factory.mktemp("interop")
    items = read_source(emoji_folder_of(tmp, emoji_items))
    embed_items(items[:20], tiny_model, tmp / "s", EmbedConfig(shard_size=8, num_workers=0))
    return tmp / "s"


def emoji_folder_of(tmp, emoji_items):
    import shutil
    from pathlib import Path

    root = tmp / "imgs"
    root.mkdir()
    for i, it in enumerate(emoji_items[:20]):
        shutil.copy(it.path, root / Path(it.path).name)
        if i % 3:  # some rows without a caption
            (root / Path(it.path).name).with_suffix(".txt").write_text(it.captions[0])
    return root


def test_export_then_import_round_trips(shards, tmp_path, tiny_model, tiny):
    res = runner.invoke(app, ["export", str(shards), "--format", "clip-retrieval", "--out", str(tmp_path / "cr")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "cr" / "img_emb" / "img_emb_0.npy").dtype == np.float16
    assert sorted(p.name for p in (tmp_path / "cr" / "metadata").iterdir()) == [
        f"metadata_{k}.parquet" for k in range(3)
    ]
    res = runner.invoke(
        app, ["import", "clip-retrieval", str(tmp_path / "cr"), "--out", str(tmp_path / "back"), "--model", tiny.config]
    )
    assert res.exit_code == 0, res.output
    a, b = _rows(shards), _rows(tmp_path / "back")
    assert a["id"] == b["id"] and a["path"] == b["path"] and a["caption"] == b["caption"]
    np.testing.assert_allclose(np.array(a["image_embedding"]), np.array(b["image_embedding"]), atol=2e-3)
    assert [t is None for t in a["text_embedding"]] == [t is None for t in b["text_embedding"]]
    got = [np.array(t) for t in b["text_embedding"] if t is not None]
    want = [np.array(t) for t in a["text_embedding"] if t is not None]
    np.testing.assert_allclose(np.stack(got), np.stack(want), atol=2e-3)
    assert ShardSet(tmp_path / "back").identity == tiny_model.identity


def test_import_refuses_misaligned_and_wrong_dimension_before_writing(shards, tmp_path, tiny_model):
    export_clip_retrieval(shards, tmp_path / "cr")
    meta = tmp_path / "cr" / "metadata" / "metadata_1.parquet"
    t = pq.read_table(meta)
    pq.write_table(t.slice(0, len(t) - 1), meta)  # one row short
    with pytest.raises(UserError, match="img_emb_1.npy has 8 rows but metadata_1.parquet has 7"):
        import_clip_retrieval(tmp_path / "cr", tmp_path / "out", tiny_model.identity)
    assert not (tmp_path / "out").exists()  # nothing half-written
    pq.write_table(t, meta)
    np.save(tmp_path / "cr" / "img_emb" / "img_emb_2.npy", np.zeros((4, tiny_model.embed_dim + 1), np.float16))
    with pytest.raises(UserError, match="dimension"):
        import_clip_retrieval(tmp_path / "cr", tmp_path / "out", tiny_model.identity)


def test_import_plain_clip_retrieval_folder_without_ids(tmp_path, tiny_model):
    d = tiny_model.embed_dim
    (tmp_path / "cr" / "img_emb").mkdir(parents=True)
    (tmp_path / "cr" / "metadata").mkdir()
    rng = np.random.default_rng(0)
    for n, rows in enumerate([3, 2]):
        np.save(tmp_path / "cr" / "img_emb" / f"img_emb_{n}.npy", rng.normal(size=(rows, d)).astype(np.float16))
        pq.write_table(
            pa.table({"image_path": [f"/x/{n}_{i}.jpg" for i in range(rows)], "caption": ["a"] * rows}),
            tmp_path / "cr" / "metadata" / f"metadata_{n}.parquet",
        )
    res = import_clip_retrieval(tmp_path / "cr", tmp_path / "bare", tiny_model.identity)
    assert res["rows"] == 5 and res["rows_with_text"] == 0  # captions but no text_emb and no text model
    assert _rows(tmp_path / "bare")["caption"] == [None] * 5
    from retriever.models.encode import encode_texts

    res = import_clip_retrieval(
        tmp_path / "cr", tmp_path / "s", tiny_model.identity, encode_texts=lambda t: encode_texts(tiny_model, t, 8)
    )
    assert res["rows_with_text"] == 5  # embedded with the named model
    rows = _rows(tmp_path / "s")
    assert rows["id"] == [0, 1, 2, 3, 4] and rows["path"][3] == "/x/1_0.jpg"
    assert np.allclose(np.linalg.norm(np.array(rows["image_embedding"]), axis=1), 1, atol=1e-5)
