"""An IVF index built in parts (`index --part I/N`) and merged on disk gives the one-process build's results."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from retriever.cli.app import app
from retriever.errors import UserError
from retriever.indexes import BuildConfig, build_index, read_index_manifest
from retriever.indexes.partitioned import build_part, merge_parts, staging_dir
from retriever.search import Retriever
from retriever.shards import ShardSet, shard_name, shard_schema, write_shard

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_model):
    """3000 random unit vectors in 10 shards (enough for 76 IVF lists), captions on every other row,
    metadata columns `camera` (text, null every seventh row) and `year`."""
    out = tmp_path_factory.mktemp("ip") / "s"
    fields = [pa.field("camera", pa.string()), pa.field("year", pa.int64())]
    schema = shard_schema(tiny_model.identity, metadata_fields=fields)
    rng = np.random.default_rng(0)
    for k in range(10):
        ids = list(range(k * 300, (k + 1) * 300))
        img = rng.normal(size=(300, tiny_model.embed_dim)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        txt = rng.normal(size=img.shape).astype(np.float32)
        txt /= np.linalg.norm(txt, axis=1, keepdims=True)
        has = np.array([i % 2 == 0 for i in ids])
        caps = [f"caption {i}" if h else None for i, h in zip(ids, has)]
        metas = [{"camera": None if i % 7 == 0 else f"cam{i % 3}", "year": 2000 + i % 20} for i in ids]
        write_shard(out / shard_name(k), schema, ids, [f"/x/{i}.jpg" for i in ids], caps, img, txt, has, metas)
    return out


def run(*args, code=0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output + (str(res.exception) if res.exception else "")
    return res


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_parts_merged_equal_one_process_build(shards, tmp_path, tiny_model, kind):
    one = tmp_path / "one"
    build_index(shards, one, BuildConfig(index_type=kind, on_disk=True))
    merged = tmp_path / "merged"
    for i in (2, 0, 1):  # any order, any process
        run("index", shards, "--out", merged, "--part", f"{i}/3", "--index-type", kind)
    assert (staging_dir(merged) / "plan.json").is_file()
    res = run("index", "merge", merged, "--json")
    assert json.loads(res.stdout)["indexes"]["image"]["extra"]["built_in_parts"] == 3
    assert not staging_dir(merged).exists()
    a, b = read_index_manifest(one), read_index_manifest(merged)
    for m in ("image", "text"):
        assert a.indexes[m].count == b.indexes[m].count and a.indexes[m].factory == b.indexes[m].factory
        assert a.indexes[m].search_params == b.indexes[m].search_params
        # the merged rows file is the one-process build's: same columns (metadata included), same rows
        rows_a, rows_b = (pa.ipc.open_file(str(d / f"{m}.rows.arrow")).read_all() for d in (one, merged))
        assert rows_b.schema.names == ["id", "path", "caption", "camera", "year"]
        assert rows_a.equals(rows_b)
    ra, rb = Retriever(one, tiny_model), Retriever(merged, tiny_model)
    vecs = ShardSet(shards).sample_vectors("image", 20, seed=3)
    for modality in ("image", "text"):
        ia, sa = ra.search_raw(vecs, 10, modality)
        ib, sb = rb.search_raw(vecs, 10, modality)
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_allclose(sa, sb, atol=1e-6)
    assert ra.manifest.indexes["image"].search_params["nprobe"] < ra.manifest.indexes["image"].count  # approximate
    hits_a = ra.search_vectors(vecs[:3], k=5, modality="text")
    hits_b = rb.search_vectors(vecs[:3], k=5, modality="text")
    assert [[(h.id, h.path, h.caption, h.metadata) for h in q] for q in hits_a] == [
        [(h.id, h.path, h.caption, h.metadata) for h in q] for q in hits_b
    ]
    assert hits_b[0][0].metadata.keys() == {"camera", "year"}
    where = "camera = 'cam1' and year >= 2010"  # --where over the merged index's metadata columns
    fa = ra.search_vectors(vecs[:3], k=5, modality="image", where=where)
    fb = rb.search_vectors(vecs[:3], k=5, modality="image", where=where)
    assert [[h.id for h in q] for q in fa] == [[h.id for h in q] for q in fb]
    assert all(h.metadata["camera"] == "cam1" and h.metadata["year"] >= 2010 for q in fb for h in q)
    assert all(len(q) == 5 for q in fb)


def test_merge_refuses_unfinished_parts_and_mixed_n(shards, tmp_path):
    out = tmp_path / "idx"
    build_part(shards, out, 0, 2, BuildConfig(index_type="ivf"))
    with pytest.raises(UserError, match="Parts 1 of 2 have not finished"):
        merge_parts(out)
    with pytest.raises(UserError, match="build in 2 parts"):
        build_part(shards, out, 0, 3, BuildConfig(index_type="ivf"))
    res = run("index", shards, "--out", out, "--part", "2/2", code=1)
    assert "between 0 and N-1" in res.output
    assert not out.exists()  # nothing is written where the index goes until the merge
