import json

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from retriever import embed as embed_mod
from retriever.data.sources import read_source
from retriever.embed import ERRORS_FILE, EmbedConfig, embed_items
from retriever.errors import UserError
from retriever.shards import ShardSet, read_shard_meta


def _rows(folder):
    t = pq.read_table(folder, columns=["id", "path", "caption", "image_embedding", "text_embedding"])
    return t.sort_by("id").to_pylist()


def test_schema_metadata_and_row_counts(tmp_path, tiny_model, emoji_folder):
    items = read_source(emoji_folder)
    res = embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(shard_size=20, num_workers=0))
    assert (res.rows, res.shards, res.skipped.count, res.skipped.file) == (64, 4, 0, None)
    files = sorted((tmp_path / "s").glob("part-*.parquet"))
    assert [f.name for f in files] == [f"part-0000{i}.parquet" for i in range(4)]
    schema = pq.read_schema(files[0])
    assert schema.field("id").type == "int64"
    assert str(schema.field("image_embedding").type) == "fixed_size_list<element: float>[32]"
    meta = read_shard_meta(schema)
    assert meta["model"] == tiny_model.identity.to_dict()
    assert (meta["dim"], meta["dtype"], meta["normalized"]) == (32, "float32", "l2")
    rows = _rows(tmp_path / "s")
    assert [r["id"] for r in rows] == list(range(64))
    v = np.array([r["image_embedding"] for r in rows])
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, rtol=1e-5)
    # pandas and duckdb read the folder as it is
    assert len(pd.read_parquet(tmp_path / "s")) == 64
    assert duckdb.sql(f"select count(*), count(distinct id) from '{tmp_path}/s/*.parquet'").fetchall() == [(64, 64)]


def test_rows_without_caption_have_null_text_embedding(tmp_path, tiny_model, emoji_folder):
    items = read_source(emoji_folder)
    items = [it if it.index % 2 else type(it)(it.index, it.path, ()) for it in items]
    embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(num_workers=0, dtype="float16"))
    ss = ShardSet(tmp_path / "s")
    assert (ss.num_rows, ss.count("text")) == (64, 32)
    rows = _rows(tmp_path / "s")
    assert all((r["caption"] is None) == (r["text_embedding"] is None) for r in rows)
    assert (
        pq.read_schema(next((tmp_path / "s").glob("*.parquet"))).field("text_embedding").type.value_type == "halffloat"
    )


def test_bad_files_are_skipped_and_reported(tmp_path, tiny_model, broken_folder):
    res = embed_items(read_source(broken_folder), tiny_model, tmp_path / "s", EmbedConfig(num_workers=2, batch_size=4))
    assert (res.rows, res.skipped.count) == (6, 3) and res.skipped.file == str(tmp_path / "s" / ERRORS_FILE)
    errors = [json.loads(line) for line in (tmp_path / "s" / ERRORS_FILE).read_text().splitlines()]
    assert sorted(e["path"].rsplit("/", 1)[1] for e in errors) == ["empty.png", "not-an-image.jpg", "truncated.png"]
    assert all(e["reason"] for e in errors)


class Boom(RuntimeError):
    pass


def test_interrupted_embed_resumes_to_identical_rows(tmp_path, tiny_model, emoji_folder, monkeypatch):
    items = read_source(emoji_folder)
    cfg = EmbedConfig(shard_size=10, num_workers=0, batch_size=4)
    embed_items(items, tiny_model, tmp_path / "full", cfg)

    real_write = embed_mod.write_shard
    calls = []

    def dying_write(*args, **kwargs):
        if len(calls) == 3:
            raise Boom("killed mid-run")
        calls.append(args[0])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(embed_mod, "write_shard", dying_write)
    with pytest.raises(Boom):
        embed_items(items, tiny_model, tmp_path / "resumed", cfg)
    monkeypatch.setattr(embed_mod, "write_shard", real_write)
    assert len(list((tmp_path / "resumed").glob("part-*.parquet"))) == 3
    assert not list((tmp_path / "resumed").glob(".*tmp"))
    res = embed_items(items, tiny_model, tmp_path / "resumed", cfg)
    assert (res.shards_resumed, res.shards_written) == (3, 4)
    full, resumed = _rows(tmp_path / "full"), _rows(tmp_path / "resumed")
    assert [r["id"] for r in resumed] == [r["id"] for r in full] == list(range(64))
    for a, b in zip(full, resumed):
        assert a["path"] == b["path"] and a["caption"] == b["caption"]
        np.testing.assert_allclose(a["image_embedding"], b["image_embedding"], atol=1e-6)


def test_rerun_with_other_arguments_is_refused_unless_overwrite(tmp_path, tiny_model, emoji_folder):
    items = read_source(emoji_folder)
    embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(shard_size=32, num_workers=0))
    with pytest.raises(UserError, match="other arguments"):
        embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(shard_size=16, num_workers=0))
    res = embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(shard_size=16, num_workers=0, overwrite=True))
    assert res.shards == 4 and len(list((tmp_path / "s").glob("part-*.parquet"))) == 4


@pytest.mark.e2e
def test_sigkilled_embed_process_resumes_without_loss_or_duplicates(tiny, tmp_path, emoji_folder):
    """A real kill -9 in the middle of a run, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "s"
    cmd = [
        sys.executable,
        "-m",
        "retriever.cli.app",
        "embed",
        str(emoji_folder),
        "--out",
        str(out),
        "--model",
        tiny.config,
        "--shard-size",
        "2",
        "--batch-size",
        "1",
        "--workers",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300  # a cold torch import alone took a minute on a loaded CI machine
    while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 3:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    n_before = len(list(out.glob("part-*.parquet")))
    assert 3 <= n_before < 32, "the run should have been killed part-way"
    subprocess.run(cmd, check=True, capture_output=True)
    rows = _rows(out)
    assert [r["id"] for r in rows] == list(range(64))
    # No temp file left; the lock file stays (deleting it on release would let two writers in).
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".retriever.lock"]
