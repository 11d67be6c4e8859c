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


def test_index_out_replaces_an_index_holding_its_onnx_export(shards, index):
    (index / "onnx").mkdir(exist_ok=True)  # what `index --onnx` (the default) adds to an index
    (index / "onnx" / "x.onnx").write_bytes(b"x")
    run("index", shards / "all", "--out", index, "--no-onnx")
    assert (index / "manifest.json").is_file() and not (index / "onnx").exists()


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


def hold_lock(folder: Path, inside: bool, seconds: float, tag: str = "") -> subprocess.Popen:
    code = (
        "import sys, time; from retriever.locks import folder_lock\n"
        f"with folder_lock({str(folder)!r}, inside={inside}, tag={tag!r}):\n"
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


def part_cfg(part: int):
    from retriever.embed import EmbedConfig

    return EmbedConfig(shard_size=2, num_workers=0, num_parts=2, part=part)


def test_parts_lock_their_own_part_only(emoji_folder, tiny_model, tmp_path):
    """Parts of one folder run side by side; a second writer of the same part is still refused."""
    from retriever.data.sources import read_source
    from retriever.embed import embed_items
    from retriever.errors import UserError

    items = read_source(emoji_folder)[:8]
    out = tmp_path / "p"
    out.mkdir()
    holder = hold_lock(out, inside=True, seconds=60, tag="-p0of2")
    try:
        assert embed_items(items, tiny_model, out, part_cfg(1)).shards_written == 2  # not refused by part 0
        with pytest.raises(UserError, match=rf"part p0of2.*pid {holder.pid}"):
            embed_items(items, tiny_model, out, part_cfg(0))
    finally:
        holder.kill()
        holder.wait()
    assert embed_items(items, tiny_model, out, part_cfg(0)).shards_written == 2
    assert sorted(p.name for p in out.glob("part-*")) == [
        "part-00000-p0of2.parquet",
        "part-00001-p1of2.parquet",
        "part-00002-p0of2.parquet",
        "part-00003-p1of2.parquet",
    ]


def test_a_part_cleans_only_its_own_leftovers(emoji_folder, tiny_model, tmp_path):
    """Another part's temp file may belong to a live writer (it holds another lock): it stays."""
    from retriever.data.sources import read_source
    from retriever.embed import embed_items
    from retriever.errors import UserError

    items = read_source(emoji_folder)[:8]
    out = tmp_path / "p"
    embed_items(items, tiny_model, out, part_cfg(1))  # the folder now holds part-tagged files only
    mine = out / ".part-00000-p0of2.parquet.0badf00d.tmp"
    theirs = out / ".part-00003-p1of2.parquet.1234abcd.tmp"
    single = out / "._errors.jsonl.feedbeef.tmp"
    for p in (mine, theirs, single):
        p.write_bytes(b"x")
    res = embed_items(items, tiny_model, out, part_cfg(0))  # --out check: a folder of parts is a shard folder
    assert res.repairs == [f"Removed {mine.name}, left in {out} by a killed run."]
    assert not mine.exists() and theirs.exists() and single.exists()
    from retriever.embed import EmbedConfig

    with pytest.raises(UserError, match="holds a --num-parts embed"):  # its parts do not hold this lock
        embed_items(items, tiny_model, out, EmbedConfig(shard_size=2, num_workers=0, overwrite=True))
    assert len(list(out.glob("part-*.parquet"))) == 4


def test_streamed_csv_captions_are_decoded_honestly_or_reported(emoji_folder, tmp_path):
    from retriever.data.sources import read_source

    pngs = [str(p) for p in sorted(emoji_folder.rglob("*.png"))[:4]]
    m = tmp_path / "m.csv"
    m.write_bytes(
        b"image,caption\n"
        + f"{pngs[0]},plain\n".encode()
        + f"{pngs[1]},".encode()
        + "café".encode("latin-1")
        + b"\n"
        + f"{pngs[2]},".encode()
        + "\ufeffcrème".encode()
        + b"\n"
        + f"{pngs[0]},again\n".encode()
    )
    items = read_source(m)
    assert [(it.path, it.captions) for it in items] == [(pngs[0], ("plain", "again")), (pngs[2], ("crème",))]
    assert [(s["path"], s["reason"][:21]) for s in items.skipped] == [(pngs[1], "caption: not UTF-8 te")]


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


# 6. Damaged artefacts: one sentence, exit 1, and an embed rerun repairs a damaged shard.


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(
        {"truncate": data[: len(data) // 2], "random": os.urandom(max(64, len(data) // 4)), "empty": b""}[how]
    )


@pytest.mark.parametrize("how", ["truncate", "random"])
def test_damaged_shard_is_one_sentence_and_embed_redoes_it(shards, emoji_folder, tmp_path, how):
    out = tmp_path / "s"
    shutil.copytree(shards / "all", out)
    damage(out / "part-00001.parquet", how)
    for args in (["index", out, "--out", tmp_path / "i"], ["info", out]):
        assert "part-00001.parquet cannot be read" in run(*args, code=1).output
    res = run("embed", emoji_folder, "--out", out, "--model", TINY_CONFIG, "--shard-size", "20", "--workers", "0")
    assert "Removed unreadable shard part-00001.parquet" in res.output
    assert "64 rows" in res.output and "1 written" in res.output
    run("index", out, "--out", tmp_path / "i")


@pytest.mark.parametrize("how", ["truncate", "random", "empty"])
@pytest.mark.parametrize("name", ["image.faiss", "image.rows.arrow"])
def test_damaged_index_file_is_one_sentence_everywhere(shards, index, name, how):
    damage(index / name, how)
    for args in (
        ["info", index],
        ["search", index, "a face", "--model", TINY_CONFIG],
        ["index", "--add", "--renumber", shards / "a", index],
    ):
        res = run(*args, code=1)
        assert f"{name} cannot be read" in res.output and "rebuild" in res.output, (args, res.output)


def test_info_check_reads_the_whole_index(index):
    run("info", "--check", index)


@pytest.mark.parametrize(
    "text",
    ["", "{not json", '{"format": "retriever-index/1"}', "[1, 2]", '{"format": "retriever-index/1", "model": 1}'],
)
def test_garbage_or_incomplete_manifest_is_one_sentence(shards, index, text):
    (index / "manifest.json").write_text(text)
    for args in (["info", index], ["index", "--add", shards / "a", index], ["search", index, "x"]):
        res = run(*args, code=1)
        assert "manifest.json" in res.output, (args, res.output)
    run("index", shards / "a", "--out", index)  # a damaged index can be rebuilt in place


def test_garbage_embed_job_file_is_refused_not_a_traceback(shards, emoji_folder, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards / "all", out)
    (out / "_embed_job.json").write_text("{truncated")
    res = run("embed", emoji_folder, "--out", out, "--model", TINY_CONFIG, "--shard-size", "20", code=1)
    assert "other arguments" in res.output


# 7. and 9. Manifests and captions: what cannot be read honestly is skipped and reported.


def test_jsonl_lines_that_are_not_objects_are_reported(emoji_folder, tmp_path):
    from retriever.data.sources import read_source

    pngs = sorted(emoji_folder.rglob("*.png"))[:2]
    m = tmp_path / "m.jsonl"
    m.write_text(
        "\n".join(
            [
                json.dumps({"image": str(pngs[0])}),
                "[1, 2, 3]",
                '"a bare string"',
                "{oops",
                json.dumps({"image": str(pngs[1])}),
            ]
        )
    )
    items = read_source(m)
    assert [it.path for it in items] == [str(pngs[0]), str(pngs[1])]
    reasons = [s["reason"] for s in items.skipped]
    assert reasons[:2] == ["row 2 is a list, not an object", "row 3 is a str, not an object"]
    assert "not JSON" in reasons[2]


def test_caption_files_are_decoded_honestly_or_reported(emoji_folder, tmp_path):
    from retriever.data.sources import read_source

    root = tmp_path / "f"
    root.mkdir()
    pngs = sorted(emoji_folder.rglob("*.png"))
    captions = {
        "bom": "\ufeffcafé crème".encode(),
        "utf16": "naïve".encode("utf-16"),
        "latin1": "café".encode("latin-1"),
        "binary": b"\x00\x01\x02PNG",
        "unreadable": None,  # a folder where the caption file should be
    }
    for i, (name, data) in enumerate(captions.items()):
        shutil.copy(pngs[i], root / f"{name}.png")
        if data is None:
            (root / f"{name}.txt").mkdir()
        else:
            (root / f"{name}.txt").write_bytes(data)
    items = read_source(root)
    assert {Path(it.path).stem: it.caption for it in items} == {"bom": "café crème", "utf16": "naïve"}
    reasons = {Path(s["path"]).stem: s["reason"] for s in items.skipped}
    assert set(reasons) == {"latin1", "binary", "unreadable"}
    assert "not UTF-8" in reasons["latin1"] and "binary" in reasons["binary"]
    assert "\ufffd" not in json.dumps([it.caption for it in items])


def test_non_string_caption_columns_are_not_stored_as_reprs(emoji_folder, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from retriever.data.sources import read_source

    pngs = [str(p) for p in sorted(emoji_folder.rglob("*.png"))[:4]]
    table = pa.table({"image": pngs[:2], "caption": [b"plain", b"\xff\xfe\x00"]})
    pq.write_table(table, tmp_path / "bytes.parquet")
    items = read_source(tmp_path / "bytes.parquet")
    assert [it.caption for it in items] == ["plain"] and len(items.skipped) == 1
    pq.write_table(pa.table({"image": pngs[2:], "caption": [{"a": 1}, {"a": 2}]}), tmp_path / "struct.parquet")
    with pytest.raises(Exception, match="no images.*2 entries were left out.*not text"):
        read_source(tmp_path / "struct.parquet")


def test_embed_writes_source_skips_to_the_errors_file(emoji_folder, tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    pngs = sorted(emoji_folder.rglob("*.png"))
    for i in range(3):
        shutil.copy(pngs[i], root / f"{i}.png")
    (root / "1.txt").write_bytes(b"\xe9t\xe9")  # Latin-1, not UTF-8
    res = run("embed", root, "--out", tmp_path / "s", "--model", TINY_CONFIG, "--workers", "0")
    assert "2 rows" in res.output and "Skipped 1" in res.output
    errors = [json.loads(line) for line in (tmp_path / "s" / "_errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["1.png"] and "not UTF-8" in errors[0]["reason"]


# 10. Every file the folder walk sees is embedded, reported or counted.


def test_tiff_svg_and_symlink_loops_are_not_dropped_silently(emoji_folder, tmp_path):
    from PIL import Image

    from retriever.data.sources import read_source

    root = tmp_path / "f"
    root.mkdir()
    Image.open(sorted(emoji_folder.rglob("*.png"))[0]).save(root / "scan.tiff")
    (root / "logo.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    os.symlink("loop.png", root / "loop.png")
    (root / "notes.md").write_text("x")
    items = read_source(root)
    assert [Path(it.path).name for it in items] == ["scan.tiff"]
    assert sorted(Path(s["path"]).name for s in items.skipped) == ["logo.svg", "loop.png"]
    assert items.not_images == 1


# 8. and 11. Bombs and huge images are refused before they are decoded.


@pytest.fixture()
def huge_png(tmp_path) -> Path:
    """12000×12000 grey PNG: 144 MP from ~140 KB, under Pillow's bomb error threshold."""
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("L", (12000, 12000), 200).save(path, optimize=True)
    return path


def test_decompression_bomb_query_is_one_sentence(index, tmp_path):
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 MP: over Pillow's own error threshold
    res = run("search", index, "--image", bomb, "--model", TINY_CONFIG, code=1)
    assert "is not a readable image" in res.output and "decompression bomb" in res.output


def test_huge_images_are_skipped_under_max_pixels(huge_png):
    from retriever.data.images import DEFAULT_MAX_PIXELS, load_image

    assert 12000 * 12000 > DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match="max-pixels"):
        load_image(huge_png)
    assert load_image(huge_png, max_pixels=200_000_000).size == (12000, 12000)


def test_large_jpegs_are_decoded_scaled_down(tmp_path):
    from PIL import Image

    from retriever.data.images import load_image

    Image.new("RGB", (9000, 9000), (10, 200, 30)).save(tmp_path / "big.jpg", quality=50)
    img = load_image(tmp_path / "big.jpg", max_pixels=10_000_000)  # 81 MP on disk, drafted to 1/8
    assert img.size == (1125, 1125) and img.getpixel((5, 5))[1] > 150


# 12. Captions beyond the context are counted; an empty query is refused.


def test_truncated_captions_are_counted_and_empty_queries_refused(emoji_folder, index, tmp_path):
    root = tmp_path / "f"
    root.mkdir()
    pngs = sorted(emoji_folder.rglob("*.png"))
    for i in range(3):
        shutil.copy(pngs[i], root / f"{i}.png")
        (root / f"{i}.txt").write_text("a red apple" if i else " ".join(["word"] * 40))
    res = run("embed", root, "--out", tmp_path / "s", "--model", TINY_CONFIG, "--workers", "0")
    assert "1 caption(s) are longer than the model's 16-token context" in res.output
    for q in ("", "   "):
        assert "query is empty" in run("search", index, q, "--model", TINY_CONFIG, code=1).output


# 14. Generated model configs live in a per-user cache, not a fixed /tmp name.


def test_model_configs_go_to_the_user_cache(tmp_path, monkeypatch):
    from retriever.models.load import load_model

    cfg = json.loads(Path(TINY_CONFIG).read_text())
    cfg["embed_dim"] = 24  # a config this process has not registered yet
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    load_model(str(tmp_path / "c.json"))
    written = list((tmp_path / "cache" / "retriever" / "model-configs").glob("retriever-cfg-*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["embed_dim"] == 24


def test_add_after_a_writer_died_between_the_two_renames_restores_and_adds(shards, index):
    old = index.parent / ".index.0badf00d.old"
    os.replace(index, old)
    res = run("index", "--add", "--renumber", shards / "a", index)
    assert "restored" in res.output and not old.exists()
    assert json.loads((index / "manifest.json").read_text())["shards"]["rows"] == 74


# Issue 10, second pass: import and export follow the --out rule and take the writer lock.


@pytest.fixture()
def exported(shards, tmp_path) -> Path:
    run("export", shards / "a", "--format", "clip-retrieval", "--out", tmp_path / "cr")
    return tmp_path / "cr"


def import_(exported: Path, out: Path, *extra, code=0):
    return run("import", "clip-retrieval", exported, "--out", out, "--model", TINY_CONFIG, *extra, code=code)


def test_import_out_refuses_a_foreign_folder_and_a_file(exported, tmp_path):
    """On main import wrote its shards into a folder of the user's files and crashed on a file."""
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("my thesis")
    res = import_(exported, user, code=1)
    assert "not a shard folder" in res.output and len(res.output.strip().splitlines()) == 1
    assert tree(user) == {"notes.txt": b"my thesis"}
    f = tmp_path / "file"
    f.write_text("keep")
    assert "not a folder" in import_(exported, f, code=1).output
    assert f.read_text() == "keep"


def test_import_replaces_a_shard_folder_only_with_overwrite(shards, exported, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards / "all", out)
    before = tree(out)
    assert "--overwrite" in import_(exported, out, code=1).output
    assert tree(out) == before
    import_(exported, out, "--overwrite")
    from retriever.shards import ShardSet

    assert ShardSet(out).num_rows == 10  # the import, whole; none of the 64 rows left
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".s.") and p.suffix in (".tmp", ".old")]


def test_import_takes_the_writer_lock_and_cleans_a_killed_imports_leftovers(exported, tmp_path):
    out = tmp_path / "s"
    holder = hold_lock(out, inside=False, seconds=30)
    try:
        res = import_(exported, out, code=1)
        assert f"pid {holder.pid}" in res.output and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    leftover = tmp_path / ".s.1234abcd.tmp"  # what a killed import leaves (atomic_dir's temp folder)
    leftover.mkdir()
    (leftover / "part-00000.parquet").write_bytes(b"half")
    res = import_(exported, out)
    assert "left by a killed writer" in res.output and not leftover.exists()


def test_import_refuses_a_folder_an_embed_is_writing(shards, exported, tmp_path):
    out = tmp_path / "s"
    shutil.copytree(shards / "a", out)
    holder = hold_lock(out, inside=True, seconds=30)  # embed's lock, inside the shard folder
    try:
        assert f"pid {holder.pid}" in import_(exported, out, "--overwrite", code=1).output
    finally:
        holder.kill()
        holder.wait()


def test_export_out_refuses_foreign_folders_the_shards_and_a_file(shards, exported, tmp_path):
    """On main export replaced whatever --out was: a folder of the user's files was deleted."""
    user = tmp_path / "mine"
    (user / "photos").mkdir(parents=True)
    (user / "photos" / "cat.jpg").write_bytes(b"meow")
    (user / "img_emb").mkdir()
    (user / "img_emb" / "notes.txt").write_text("not an export")
    before = tree(user)
    f = tmp_path / "file"
    f.write_text("keep")
    copy = tmp_path / "copy"
    shutil.copytree(shards / "a", copy)
    for target, words in ((user, "not a clip-retrieval folder"), (f, "is a file"), (copy, "overlaps the shard folder")):
        res = run("export", copy, "--format", "clip-retrieval", "--out", target, code=1)
        assert words in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert tree(user) == before and f.read_text() == "keep" and (copy / "part-00000.parquet").is_file()
    run("export", shards / "b", "--format", "clip-retrieval", "--out", exported)  # an earlier export is replaced
    import pyarrow.parquet as pq

    paths = pq.read_table(exported / "metadata" / "metadata_0.parquet").column("image_path").to_pylist()
    assert len(paths) == 10 and set(paths).isdisjoint(
        pq.read_table(shards / "a" / "part-00000.parquet").column("path").to_pylist()
    )


def test_export_takes_the_writer_lock(shards, exported):
    holder = hold_lock(exported, inside=False, seconds=30)
    try:
        res = run("export", shards / "b", "--format", "clip-retrieval", "--out", exported, code=1)
        assert f"pid {holder.pid}" in res.output and "--wait" in res.output
    finally:
        holder.kill()
        holder.wait()


# Damaged files of a partitioned build (index --part / index merge) and of rows files: one sentence.


@pytest.fixture(scope="module")
def staged(tmp_path_factory, tiny_model) -> Path:
    """Shards of 1200 random vectors (enough for IVF) and both parts of a 2-part build, kept pristine."""
    import numpy as np

    from retriever.shards import shard_name, shard_schema, write_shard

    root = tmp_path_factory.mktemp("staged")
    schema = shard_schema(tiny_model.identity)
    rng = np.random.default_rng(0)
    for k in range(4):
        ids = list(range(k * 300, (k + 1) * 300))
        img = rng.normal(size=(300, tiny_model.embed_dim)).astype(np.float32)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        paths = [f"/x/{i}.jpg" for i in ids]
        write_shard(root / "s" / shard_name(k), schema, ids, paths, [None] * 300, img, 0 * img, np.zeros(300, bool))
    for i in (0, 1):
        run("index", root / "s", "--out", root / "idx", "--part", f"{i}/2", "--index-type", "ivf")
    shutil.move(root / "idx.parts", root / "pristine")
    return root


def fresh_stage(staged: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(staged / "pristine", tmp_path / "idx.parts")
    return tmp_path / "idx", tmp_path / "idx.parts"


def one_sentence(output: str) -> str:
    """The command's own output: faiss's C++ stderr line about moved on-disk files is not ours."""
    lines = [x for x in output.strip().splitlines() if x.strip() and not x.startswith("IO_FLAG_ONDISK")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("how", ["truncate", "random", "empty"])
@pytest.mark.parametrize(
    "name",
    [
        "plan.json",
        "trained/image.trained.faiss",
        "part-0of2/done.json",
        "part-0of2/image.faiss",
        "part-1of2/image.rows.arrow",
    ],
)
def test_damaged_staged_build_file_is_one_sentence_for_merge(staged, tmp_path, name, how):
    """On main: a JSONDecodeError, faiss RuntimeError or ArrowInvalid traceback."""
    index, stage = fresh_stage(staged, tmp_path)
    damage(stage / name, how)
    line = one_sentence(run("index", "merge", index, code=1).output)
    assert f"{Path(name).name} cannot be read" in line and "delete" in line, line
    assert not index.exists()


@pytest.mark.parametrize("how", ["truncate", "empty"])
def test_truncated_ivfdata_of_a_part_is_one_sentence_not_a_sigbus(staged, tmp_path, how):
    """faiss memory-maps .ivfdata without checking its size: on main the merge died of SIGBUS (rc -7)."""
    index, stage = fresh_stage(staged, tmp_path)
    damage(stage / "part-0of2" / "image.ivfdata", how)
    p = cli("index", "merge", index)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 1, (p.returncode, stderr)
    line = one_sentence(stdout + stderr)
    assert "image.ivfdata cannot be read" in line and "part 0 of 2" in line, line


@pytest.mark.parametrize("how", ["truncate", "random", "empty"])
@pytest.mark.parametrize("name", ["plan.json", "trained/image.trained.faiss"])
def test_damaged_plan_or_quantizer_is_one_sentence_for_a_part(staged, tmp_path, name, how):
    index, stage = fresh_stage(staged, tmp_path)
    shutil.rmtree(stage / "part-1of2")
    damage(stage / name, how)
    line = one_sentence(
        run("index", staged / "s", "--out", index, "--part", "1/2", "--index-type", "ivf", code=1).output
    )
    assert f"{Path(name).name} cannot be read" in line and f"delete {stage}" in line, line


def test_incomplete_done_file_is_one_sentence(staged, tmp_path):
    index, stage = fresh_stage(staged, tmp_path)
    (stage / "part-1of2" / "done.json").write_text('{"part": 1, "entries": {}}')
    line = one_sentence(run("index", "merge", index, code=1).output)
    assert "done.json cannot be read (incomplete" in line and "part 1 of 2" in line, line
    again = run("index", staged / "s", "--out", index, "--part", "1/2", "--index-type", "ivf", code=1)
    assert "done.json cannot be read" in one_sentence(again.output)  # not taken as a finished part
    shutil.rmtree(stage / "part-1of2")  # the sentence's advice works
    run("index", staged / "s", "--out", index, "--part", "1/2", "--index-type", "ivf")
    run("index", "merge", index)


@pytest.mark.parametrize("how", ["truncate", "random", "empty"])
def test_rows_file_readers_give_one_sentence(index, how):
    from retriever.errors import UserError
    from retriever.indexes.rows import file_schema, iter_file_batches

    damage(index / "image.rows.arrow", how)
    with pytest.raises(UserError, match="image.rows.arrow cannot be read"):
        file_schema(index / "image.rows.arrow")
    with pytest.raises(UserError, match="image.rows.arrow cannot be read"):
        list(iter_file_batches(index / "image.rows.arrow"))


def test_truncated_ivfdata_of_an_on_disk_index_is_one_sentence(staged, tmp_path):
    """A search or info over an on-disk index whose .ivfdata was cut short died of SIGBUS on main."""
    index = tmp_path / "idx"
    run("index", staged / "s", "--out", index, "--index-type", "ivf", "--on-disk", "--no-onnx")
    damage(index / "image.ivfdata", "truncate")
    for args in (["info", index], ["search", index, "a face", "--model", TINY_CONFIG]):
        p = cli(*args)
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 1, (args, p.returncode, stderr)
        line = one_sentence(stdout + stderr)
        assert "image.ivfdata cannot be read" in line and "rebuild" in line, line


# `search --image` names --max-pixels in its refusal: search now has that option (the library's keyword).


@pytest.mark.parametrize("model", [["--model", TINY_CONFIG], []])  # torch, and the index's own encoder (ONNX)
def test_search_max_pixels_option_sets_the_query_image_limit(emoji_folder, index, model):
    image = sorted(emoji_folder.rglob("*.png"))[0]  # 72×72 = 5184 pixels
    run("search", index, "--image", image, *model)
    res = run("search", index, "--image", image, "--max-pixels", "5000", *model, code=1)
    assert "over the limit of 0.005 MP (--max-pixels)" in res.output and len(res.output.strip().splitlines()) == 1
    run("search", index, "--image", image, "--max-pixels", "6000", *model)
    assert "--max-pixels" in run("search", "--help").output


def test_retriever_max_pixels_defaults_to_the_decode_limit(index, tiny_model, tmp_path):
    from PIL import Image

    from retriever.data.images import DEFAULT_MAX_PIXELS
    from retriever.errors import UserError
    from retriever.search import Retriever

    big = tmp_path / "big.png"
    Image.new("L", (300, 300), 128).save(big)
    with Retriever(index, tiny_model) as r:
        assert r.max_pixels == DEFAULT_MAX_PIXELS
        r.search(image=big, k=1)
    with Retriever(index, tiny_model, max_pixels=300 * 300 - 1) as r, pytest.raises(UserError, match="max-pixels"):
        r.search(image=big, k=1)


def test_a_parts_row_count_reads_only_its_own_footers(emoji_folder, tiny_model, tmp_path, monkeypatch):
    """A part's result counts its own rows (written now, or kept: from their footers). On main it read
    every part's shards, so another part's damaged shard failed this part after its work was done,
    and the count depended on how far the other parts had got."""
    import pyarrow.parquet as pq

    from retriever.data.sources import read_source
    from retriever.embed import EmbedConfig, embed_items

    items = read_source(emoji_folder)[:10]
    out = tmp_path / "p"
    first = embed_items(items, tiny_model, out, part_cfg(0))
    assert first.rows == 6 and first.shards_written == 3  # shards 0, 2, 4 of 2 rows: before part 1 ran
    assert embed_items(items, tiny_model, out, part_cfg(1)).rows == 4
    (out / "part-00001-p1of2.parquet").write_bytes(os.urandom(200))  # the other part's shard, damaged
    opened = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda p, *a, **k: opened.append(Path(p).name) or real(p, *a, **k))
    again = embed_items(items, tiny_model, out, part_cfg(0))  # every shard kept: counted from footers
    assert (again.rows, again.shards_written, again.shards_resumed) == (6, 0, 3)
    assert "part-00001-p1of2.parquet" not in opened
    one = embed_items(items, tiny_model, tmp_path / "one", EmbedConfig(shard_size=4, num_workers=0))
    assert (
        one.rows == 10
        and embed_items(items, tiny_model, tmp_path / "one", EmbedConfig(shard_size=4, num_workers=0)).rows == 10
    )
