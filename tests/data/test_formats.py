"""Input formats built as small generated files: webdataset tars, img2dataset / HF image Parquet,
TIFF, hidden-file skipping, streamed manifests with metadata; each embedded end to end."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from retriever.data.images import load_image
from retriever.data.sources import read_source
from retriever.data.webdataset import expand_braces
from retriever.embed import EmbedConfig, embed_items
from retriever.errors import UserError


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png(item) -> bytes:
    return Path(item.path).read_bytes()


def _write_tar(path: Path, samples, extra=()) -> None:
    with tarfile.open(path, "w") as tf:
        for key, item in samples:
            _add(tf, f"{key}.png", _png(item))
            _add(tf, f"{key}.txt", item.captions[0].encode())
            _add(tf, f"{key}.json", json.dumps({"key": key, "url": f"http://x/{key}", "width": 72}).encode())
        for name, data in extra:
            _add(tf, name, data)


@pytest.fixture()
def tar_shards(tmp_path, emoji_items):
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "00000.tar", [(f"{i:09d}", emoji_items[i]) for i in range(4)])
    _write_tar(
        shards / "00001.tar",
        [(f"{i:09d}", emoji_items[i]) for i in range(4, 7)],
        extra=[
            ("000000099.txt", b"a caption with no image"),  # member without an image
            ("000000004.png", _png(emoji_items[9])),  # duplicated key, not adjacent to the first
            ("._000000005.png", b"AppleDouble junk"),  # hidden
        ],
    )
    good = (shards / "00000.tar").read_bytes()
    (shards / "00002.tar").write_bytes(good[: len(good) // 2])  # truncated
    (shards / "00003.tar").write_bytes(b"this is not a tar" * 100)
    return shards


def test_brace_expansion_keeps_padding_and_lists():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{n:05d}.tar" for n in range(8, 12)]
    assert expand_braces("{a,b}/{1..2}.tar") == ["a/1.tar", "a/2.tar", "b/1.tar", "b/2.tar"]


def test_webdataset_items_locations_captions_metadata_and_problems(tar_shards, emoji_items):
    items = read_source(str(tar_shards / "{00000..00003}.tar"))
    assert [it.index for it in items] == list(range(len(items)))
    keys = [it.path.rpartition("#")[2] for it in items]
    # 4 + 3 from the good shards, then whatever of the truncated shard is whole (<4), never duplicates.
    assert keys[:7] == [f"{i:09d}" for i in range(7)]
    assert 7 <= len(items) < 11
    assert items[5].caption == emoji_items[5].captions[0]
    assert items[5].metadata["url"] == "http://x/000000005" and items[5].metadata["width"] == 72
    reasons = {(Path(p["path"].split("#")[0]).name, p["reason"].split(" ")[0]) for p in items.skipped}
    assert ("00001.tar", "no") in reasons  # no image member
    assert ("00001.tar", "duplicated") in reasons
    assert ("00002.tar", "truncated") in reasons
    assert ("00003.tar", "not") in reasons
    # The image of a tar item reads back by its location, also without the offset table.
    first = load_image(items[5].path)
    assert first.size == Image.open(emoji_items[5].path).size
    assert (tar_shards / "00001.tar.idx.json").is_file()
    (tar_shards / "00001.tar.idx.json").unlink()
    assert load_image(items[6].path).size == first.size
    # A glob and the folder itself name the same shards.
    assert [it.path for it in read_source(str(tar_shards / "0000[0-1].tar"))] == [it.path for it in items[:7]]
    assert len(read_source(tar_shards)) == len(items)


def test_all_bad_tars_are_refused_in_one_sentence(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"junk" * 10)
    with pytest.raises(UserError, match="no readable images.*not a readable tar"):
        read_source(tmp_path / "a.tar")


def test_webdataset_embeds_end_to_end(tar_shards, tiny_model, tmp_path):
    items = read_source(str(tar_shards / "{00000..00001}.tar"))
    res = embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(num_workers=2, batch_size=3, shard_size=4))
    assert res.rows == 7 and res.skipped.count == 0
    table = pq.read_table(tmp_path / "s")
    assert sorted(table.column("id").to_pylist()) == list(range(7))
    assert all("#" in p for p in table.column("path").to_pylist())


def _image_parquet(path: Path, emoji_items, hf: bool, bad_rows=(), base: Path | None = None):
    cells, caps = [], []
    for i, it in enumerate(emoji_items[:6]):
        data = _png(it)
        if i in bad_rows:
            data = b"not an image at all" if i % 2 else None
        if hf:
            if i == 1 and base is not None:  # a cell pointing at a file instead of holding bytes
                (base / "one.png").write_bytes(_png(it))
                cells.append({"bytes": None, "path": "one.png"})
            else:
                cells.append({"bytes": data, "path": f"{i}.png"})
        else:
            cells.append(data)
        caps.append(it.captions[0])
    if hf:
        img = pa.array(cells, pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
        table = pa.table({"image": img, "text": caps})
    else:
        table = pa.table({"key": [f"{i:09d}" for i in range(6)], "jpg": pa.array(cells, pa.binary()), "caption": caps})
    pq.write_table(table, path, row_group_size=4)


@pytest.mark.parametrize("hf", [False, True], ids=["img2dataset", "huggingface"])
def test_image_parquet_embeds_and_reports_bad_cells(tmp_path, emoji_items, tiny_model, hf):
    path = tmp_path / "images.parquet"
    _image_parquet(path, emoji_items, hf, bad_rows=(3, 4), base=tmp_path)
    items = read_source(path)
    assert [it.path for it in items] == [f"{path.resolve()}#{i}" for i in range(6)]
    assert items[2].caption == emoji_items[2].captions[0]
    if not hf:
        assert items[2].metadata == {"key": "000000002"}
    # Row 5 lives in the second row group; row 1 (HF) is a path reference next to the file.
    assert load_image(items[5].path).size == load_image(emoji_items[5].path).size
    assert load_image(items[1].path).size == load_image(emoji_items[1].path).size
    res = embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(num_workers=0, batch_size=4))
    assert res.rows == 4 and res.skipped.count == 2
    bad = [json.loads(x) for x in (tmp_path / "s" / "_errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in bad) == [3, 4]


def test_tiff_read_and_hidden_and_nas_folders_skipped(tmp_path, emoji_items, tiny_model):
    Image.open(emoji_items[0].path).convert("RGBA").convert("RGB").save(tmp_path / "a.tif")
    Image.open(emoji_items[1].path).convert("RGBA").convert("RGB").save(tmp_path / "b.tiff")
    for junk in ("@eaDir/a.tif/SYNOFILE_THUMB_M.jpg", ".hidden/c.png", "__MACOSX/._a.png", "._b.png"):
        (tmp_path / junk).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(emoji_items[2].path, tmp_path / junk)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    items = read_source(tmp_path)
    assert [Path(it.path).name for it in items] == ["a.tif", "b.tiff"]
    assert load_image(items[0].path).mode == "RGB"
    res = embed_items(items, tiny_model, tmp_path / "out" / "s", EmbedConfig(num_workers=0))
    assert res.rows == 2 and res.skipped.count == 0


def test_heic_read_when_pillow_heif_installed(tmp_path, emoji_items):
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    Image.open(emoji_items[0].path).convert("RGB").save(tmp_path / "a.heic")
    items = read_source(tmp_path)
    assert load_image(items[0].path).size == (72, 72)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_streamed_manifest_keeps_order_metadata_and_merges(tmp_path, emoji_items, kind, tiny_model):
    rows = [{"image": emoji_items[i].path, "caption": f"c{i}", "source": f"s{i}", "score": str(i)} for i in range(5)]
    rows.append({"image": emoji_items[1].path, "caption": "again", "source": "dup", "score": "9"})
    path = tmp_path / f"m.{kind}"
    if kind == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        # Invalid UTF-8 in a metadata cell costs a replacement character, not the file; in a caption
        # it costs that row, reported (issue 10's honest-caption rule): no mojibake is embedded.
        bad_caption = f"{emoji_items[5].path},".encode() + b"c5\xff,s5,5\n"
        path.write_bytes(path.read_bytes().replace(b"s3", b"s3\xff") + bad_caption)
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    items = read_source(path)
    assert len(items) == 5
    assert [it.index for it in items] == list(range(5))
    assert [it.path for it in items] == [str(Path(emoji_items[i].path)) for i in range(5)]
    assert items[1].captions == ("c1", "again")
    # CSV cells are typed per column; Parquet keeps its column's own type (text here)
    assert items[1].metadata == {"source": "s1", "score": 1 if kind == "csv" else "1"}
    assert items[3].caption == "c3" and items[3].metadata["source"].startswith("s3")
    if kind == "csv":
        assert [(e["path"], e["reason"][:18]) for e in items.skipped] == [
            (str(Path(emoji_items[5].path)), "caption: not UTF-8")
        ]
    assert [it.path for it in items[1:3]] == [items[1].path, items[2].path]
    res = embed_items(items, tiny_model, tmp_path / "s", EmbedConfig(num_workers=0))
    assert res.rows == 5 and pq.read_table(tmp_path / "s").column("caption").to_pylist()[1] == "c1"


def test_a_photo_folder_with_a_stray_tar_stays_a_photo_folder(tmp_path, emoji_items):
    shutil.copy(emoji_items[0].path, tmp_path / "a.png")
    _write_tar(tmp_path / "backup.tar", [("000000001", emoji_items[1])])
    items = read_source(tmp_path)
    assert [Path(it.path).name for it in items] == ["a.png"]


def test_location_bytes_are_the_member_bytes(tar_shards, emoji_items):
    from retriever.data.locations import read_location_bytes, split_location

    items = read_source(tar_shards / "00000.tar")
    assert read_location_bytes(items[2].path) == Path(emoji_items[2].path).read_bytes()
    assert split_location(emoji_items[2].path) is None  # a plain file stays a file
    odd = tar_shards.parent / "a#1.png"  # a real file whose name has a '#'
    shutil.copy(emoji_items[0].path, odd)
    assert read_location_bytes(str(odd)) == Path(emoji_items[0].path).read_bytes()


def test_cli_embeds_a_brace_expansion_and_lists_what_it_skipped(tar_shards, tmp_path, tiny):
    from typer.testing import CliRunner

    from retriever.cli.app import app

    spec = str(tar_shards / "{00000..00003}.tar")
    res = CliRunner().invoke(
        app, ["embed", spec, "--out", str(tmp_path / "s"), "--model", tiny.config, "--workers", "0"]
    )
    assert res.exit_code == 0, res.output
    assert "Skipped 4 unreadable" in res.output and "00003.tar: not a readable tar" in res.output
    assert "duplicated key '000000004'" in res.output
    logged = [json.loads(x) for x in (tmp_path / "s" / "_errors.jsonl").read_text().splitlines()]
    assert len([e for e in logged if e["shard"] is None]) == 4  # kept with the decode errors
