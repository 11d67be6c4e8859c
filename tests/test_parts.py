"""Embedding in parts (--num-parts/--part, torchrun ranks): together the parts write the rows one
process writes; each resumes alone; mixed arguments are refused; index waits for every part."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from retriever.cli.app import app
from retriever.data.sources import read_source
from retriever.embed import EmbedConfig, embed_items
from retriever.errors import UserError
from retriever.indexes import build_index
from retriever.info import folder_info

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rows_of(folder: Path) -> dict:
    t = pq.read_table(folder, columns=["id", "path", "caption", "image_embedding", "text_embedding"]).sort_by("id")
    d = t.to_pydict()
    d["image_embedding"] = np.array(d["image_embedding"], np.float32)
    d["text_embedding"] = [None if v is None else np.array(v, np.float32) for v in d["text_embedding"]]
    return d


def assert_same_rows(a: dict, b: dict) -> None:
    assert a["id"] == b["id"] and a["path"] == b["path"] and a["caption"] == b["caption"]
    np.testing.assert_allclose(a["image_embedding"], b["image_embedding"], atol=1e-6)
    assert [v is None for v in a["text_embedding"]] == [v is None for v in b["text_embedding"]]
    for x, y in zip(a["text_embedding"], b["text_embedding"]):
        if x is not None:
            np.testing.assert_allclose(x, y, atol=1e-6)


@pytest.fixture(scope="module")
def single(tmp_path_factory, emoji_folder, tiny_model):
    out = tmp_path_factory.mktemp("single") / "s"
    embed_items(read_source(emoji_folder)[:30], tiny_model, out, EmbedConfig(shard_size=4, num_workers=0))
    return out


def cfg(part: int, n: int = 3, **kw) -> EmbedConfig:
    return EmbedConfig(shard_size=4, num_workers=0, num_parts=n, part=part, **kw)


def test_parts_union_is_the_single_run_and_each_resumes_alone(single, emoji_folder, tiny_model, tmp_path):
    items = read_source(emoji_folder)[:30]
    out = tmp_path / "p"
    r0 = embed_items(items, tiny_model, out, cfg(0))
    assert r0.shards == 3 and sorted(p.name for p in out.glob("*-p0of3.parquet"))[0] == "part-00000-p0of3.parquet"
    # Part 0 alone: info names what is missing, index refuses in one sentence naming parts 1 and 2.
    st = folder_info(out)["parts"]
    assert st["complete"] == [0] and st["not_started"] == [1, 2]
    with pytest.raises(UserError, match=r"part 1 \(not started\), part 2 \(not started\)"):
        build_index(out, tmp_path / "i")
    # A part with another --num-parts, or other arguments, is refused; nothing written is touched.
    with pytest.raises(UserError, match="--num-parts 3 run"):
        embed_items(items, tiny_model, out, cfg(1, n=4))
    with pytest.raises(UserError, match="other arguments.*dtype"):
        embed_items(items, tiny_model, out, cfg(1, dtype="float16"))
    assert len(list(out.glob("part-*"))) == 3
    embed_items(items, tiny_model, out, cfg(1))
    (out / "part-00005-p2of3.parquet").unlink(missing_ok=True)  # part 2 never ran; make it partial
    r2 = embed_items(items, tiny_model, out, cfg(2))
    assert r2.shards_written == 2
    (out / "part-00005-p2of3.parquet").unlink()  # killed after one shard: a rerun redoes only that one
    st = folder_info(out)["parts"]
    assert st["partial"] == {2: "1 of 2 shards"}
    with pytest.raises(UserError, match=r"part 2 \(1 of 2 shards\)"):
        build_index(out, tmp_path / "i")
    again = embed_items(items, tiny_model, out, cfg(2))
    assert again.shards_written == 1 and again.shards_resumed == 1
    assert folder_info(out)["parts"]["complete"] == [0, 1, 2]
    assert_same_rows(rows_of(out), rows_of(single))
    build_index(out, tmp_path / "i")


def test_part_flags_are_checked(emoji_folder, tiny_model, tmp_path):
    items = read_source(emoji_folder)[:4]
    with pytest.raises(UserError, match="--part must be between 0 and 1"):
        embed_items(items, tiny_model, tmp_path / "x", cfg(2, n=2))
    embed_items(items, tiny_model, tmp_path / "one", EmbedConfig(num_workers=0))
    with pytest.raises(UserError, match="one-process embed"):
        embed_items(items, tiny_model, tmp_path / "one", cfg(0, n=2))


@pytest.mark.e2e
def test_two_torchrun_processes_write_the_rows_of_one(single, emoji_folder, tmp_path, tiny):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    # The same 30 items as `single`: a manifest of them (embed's source is a path).
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"image": it.path, "caption": it.caption}) + "\n" for it in read_source(emoji_folder)[:30])
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "retriever.cli.app", "embed", str(manifest), "--out", str(tmp_path / "d"), "--model", tiny.config]
    cmd += ["--shard-size", "4", "--workers", "0", "--json"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["parts"]["complete"] == [0, 1]
    assert (report["rows"], report["shards"]) == (30, 8)  # rank 0 reports the whole job, after the barrier
    assert sorted(p.name for p in (tmp_path / "d").glob("part-*"))[:2] == [
        "part-00000-p0of2.parquet",
        "part-00001-p1of2.parquet",
    ]
    assert_same_rows(rows_of(tmp_path / "d"), rows_of(single))
    res = CliRunner().invoke(app, ["info", str(tmp_path / "d")])
    assert "2 of 2 complete" in res.output
