"""Issue 10 regressions: never destroy what the user has, one writer per folder, nothing left behind.

Each test is a case that failed on main before the fix (data deleted, an addition lost, a live
run's temp file removed, a dead end after a kill, a traceback for a damaged file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_CONFIG
from typer.testing import CliRunner

from retriever.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


def run(*args, code=0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output + (repr(res.exception) if res.exception else "")
    assert "Traceback" not in res.output
    return res


def cli(*args, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "retriever", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def shards(tmp_path_factory, emoji_folder) -> Path:
    """Three shard folders from one tiny model: all 64 images, and two disjoint halves of a subset."""
    tmp = tmp_path_factory.mktemp("rel")
    run("embed", emoji_folder, "--out", tmp / "all", "--model", TINY_CONFIG, "--shard-size", "20", "--workers", "0")
    files = sorted(p for p in emoji_folder.rglob("*.png"))
    for name, part in (("a", files[:10]), ("b", files[10:20])):
        manifest = tmp / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps({"image": str(p), "caption": p.stem}) + "\n" for p in part))
        run("embed", manifest, "--out", tmp / name, "--model", TINY_CONFIG, "--workers", "0")
    return tmp


@pytest.fixture()
def index(shards, tmp_path) -> Path:
    run("index", shards / "all", "--out", tmp_path / "index")
    return tmp_path / "index"


# 1. `--out` replaces only what retriever made.


def test_index_out_refuses_an_unrelated_folder(shards, tmp_path):
    user = tmp_path / "mine"
    (user / "photos").mkdir(parents=True)
    (user / "notes.txt").write_text("my thesis")
    (user / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 not really")
    before = tree(user)
    res = run("index", shards / "all", "--out", user, code=1)
    assert "not a retriever index" in res.output
    assert tree(user) == before


def test_index_out_refuses_the_shard_folder_and_a_file(shards, tmp_path):
    before = tree(shards / "all")
    assert "overlaps the shard folder" in run("index", shards / "all", "--out", shards / "all", code=1).output
    assert tree(shards / "all") == before
    f = tmp_path / "report.pdf"
    f.write_bytes(b"%PDF precious")
    assert "is a file" in run("index", shards / "all", "--out", f, code=1).output
    assert f.read_bytes() == b"%PDF precious"


def test_index_out_replaces_an_index_and_an_empty_folder(shards, index, tmp_path):
    run("index", shards / "a", "--out", index)
    assert json.loads((index / "manifest.json").read_text())["shards"]["rows"] == 10
    (tmp_path / "empty").mkdir()
    run("index", shards / "a", "--out", tmp_path / "empty")
    # A stray manifest.json does not make a folder of photos an index.
    (tmp_path / "trap").mkdir()
    (tmp_path / "trap" / "manifest.json").write_text("{}")
    (tmp_path / "trap" / "holiday.jpg").write_bytes(b"x")
    run("index", shards / "a", "--out", tmp_path / "trap", code=1)
    assert (tmp_path / "trap" / "holiday.jpg").exists()


def test_embed_out_refuses_a_folder_of_other_files(emoji_folder, tmp_path):
    user = tmp_path / "docs"
    user.mkdir()
    (user / "letter.txt").write_text("dear")
    res = run("embed", emoji_folder, "--out", user, "--model", TINY_CONFIG, "--workers", "0", code=1)
    assert "not a shard folder" in res.output
    assert sorted(p.name for p in user.iterdir()) == ["letter.txt"]


def test_demo_workspace_refuses_an_unrelated_folder(tmp_path):
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "thesis.tex").write_text("x")
    assert "not a demo workspace" in run("demo", "--workspace", tmp_path / "ws", code=1).output
    assert (tmp_path / "ws" / "thesis.tex").read_text() == "x"


def test_train_out_refuses_a_file_and_a_foreign_folder(emoji_folder, tmp_path):
    from retriever.errors import UserError
    from retriever.training.loop import TrainConfig, train

    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(UserError, match="is a file"):
        train(TrainConfig(source=str(emoji_folder), out=str(f), model=TINY_CONFIG, workers=0))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.txt").write_text("keep")
    with pytest.raises(UserError, match="not a training run folder"):
        train(TrainConfig(source=str(emoji_folder), out=str(tmp_path / "d"), model=TINY_CONFIG, workers=0))
    assert f.read_text() == "keep" and (tmp_path / "d" / "x.txt").read_text() == "keep"


# 2. One writer per folder.


def hold_lock(folder: Path, inside: bool, seconds: float) -> subprocess.Popen:
    code = (
        "import sys, time; from retriever.locks import folder_lock\n"
        f"with folder_lock({str(folder)!r}, inside={inside}):\n"
        "    print('held', flush=True); time.sleep(float(sys.argv[1]))\n"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_second_index_writer_is_refused_naming_the_holder(shards, index):
    holder = hold_lock(index, inside=False, seconds=30)
    try:
        res = run("index", "--add", shards / "a", index, code=1)
        assert f"pid {holder.pid}" in res.output and "--wait" in res.output
        assert json.loads((index / "manifest.json").read_text())["shards"]["rows"] == 64
    finally:
        holder.kill()
        holder.wait()


def test_concurrent_adds_with_wait_keep_both_additions(shards, index):
    """On main both printed 'Updated' and the last swap won: one addition was lost (4/4 tries)."""
    procs = [cli("index", "--add", "--renumber", "--wait", shards / name, index) for name in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["shards"]["rows"] == 64 + 10 + 10
    assert sorted(Path(a["folder"]).name for a in manifest["shards"]["added"]) == ["a", "b"]
    assert manifest["indexes"]["image"]["count"] == 84


def test_wait_says_it_is_waiting_then_proceeds(shards, index):
    holder = hold_lock(index, inside=False, seconds=3)
    t = time.perf_counter()
    res = run("index", "--add", "--renumber", "--wait", shards / "a", index)
    assert time.perf_counter() - t > 1.5  # it really waited for the holder
    assert "Waiting for another retriever process" in res.output
    holder.wait()


# 3. and 4. Temp files: only a dead writer's are removed, and the next writer says so.


def test_embed_keeps_a_live_runs_temp_file(shards, emoji_folder, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards / "all", out)
    live = out / ".part-00003.parquet.1234abcd.tmp"
    live.write_bytes(b"being written")
    holder = hold_lock(out, inside=True, seconds=30)
    try:
        res = run("embed", emoji_folder, "--out", out, "--model", TINY_CONFIG, "--shard-size", "20", code=1)
        assert f"pid {holder.pid}" in res.output
        assert live.read_bytes() == b"being written"
    finally:
        holder.kill()
        holder.wait()
    # The holder is dead now: its temp file is stale, removed by the next run, which says so.
    res = run("embed", emoji_folder, "--out", out, "--model", TINY_CONFIG, "--shard-size", "20", "--workers", "0")
    assert not live.exists() and "Removed .part-00003.parquet.1234abcd.tmp" in res.output


def test_next_index_writer_cleans_what_killed_writers_left(shards, index):
    for name in (".index.k1ll3d00.tmp", ".index.abc_defg.old"):
        (index.parent / name).mkdir()
        (index.parent / name / "image.faiss").write_bytes(b"\0" * 1000)
    res = run("index", "--add", "--renumber", shards / "a", index)
    assert "removed .index.k1ll3d00.tmp" in res.output and "removed .index.abc_defg.old" in res.output
    assert sorted(p.name for p in index.parent.iterdir() if p.name.startswith(".index.")) == [".index.lock"]


def test_a_writer_killed_between_the_two_renames_loses_nothing(shards, index):
    """atomic_dir moves the old folder away, then the new one in: a kill between leaves only `.old`."""
    old = index.parent / ".index.deadbeef.old"
    os.replace(index, old)
    run("index", shards / "a", "--out", index)
    assert not old.exists()
    assert json.loads((index / "manifest.json").read_text())["shards"]["rows"] == 10


def test_folders_honour_the_umask(shards, tmp_path):
    old = os.umask(0o022)
    try:
        run("index", shards / "a", "--out", tmp_path / "idx")
    finally:
        os.umask(old)
    assert (tmp_path / "idx").stat().st_mode & 0o777 == 0o755  # mkdtemp made it 0700


# 5. A train killed before its first checkpoint can be started again.


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("resume", [False, True])
def test_train_killed_before_its_first_checkpoint_restarts(emoji_folder, tmp_path, resume):
    from retriever.training.loop import TrainConfig, train

    cfg = TrainConfig(
        source=str(emoji_folder), out=str(tmp_path / "run"), model=TINY_CONFIG, epochs=1, batch_size=16, workers=0
    )
    # What a kill before the first checkpoint leaves: run.json and nothing else.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps(cfg.to_dict()))
    cfg.resume = resume
    result = train(cfg)
    assert (tmp_path / "run" / "last" / "train_state.pt").is_file()
    assert result.history
