import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retriever.data.sources import read_source
from retriever.errors import UserError


def test_folder_is_recursive_sorted_with_txt_captions(emoji_folder):
    items = read_source(emoji_folder)
    assert len(items) == 64
    assert [it.index for it in items] == list(range(64))
    rel = [it.path for it in items]
    assert rel == sorted(rel)
    assert all(it.caption and "\n" not in it.caption for it in items)


def test_folder_ignores_other_files_and_uppercase_extensions_count(tmp_path, emoji_items):
    (tmp_path / "a.PNG").write_bytes(open(emoji_items[0].path, "rb").read())
    (tmp_path / "notes.md").write_text("x")
    items = read_source(tmp_path)
    assert len(items) == 1 and items[0].caption is None


@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "parquet"])
def test_manifests_resolve_relative_paths_and_merge_captions(tmp_path, emoji_items, kind):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = []
    for i, it in enumerate(emoji_items[:3]):
        (img_dir / f"{i}.png").write_bytes(open(it.path, "rb").read())
        rows.append({"file": f"imgs/{i}.png", "alt": it.captions[0]})
    rows.append({"file": "imgs/0.png", "alt": "second caption"})  # same image, another caption
    path = tmp_path / f"m.{kind}"
    if kind in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, ["file", "alt"], delimiter="," if kind == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    elif kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    items = read_source(path, image_column="file", caption_column="alt")
    assert len(items) == 3
    assert items[0].path == str((img_dir / "0.png").resolve())
    assert items[0].captions == (emoji_items[0].captions[0], "second caption")


def test_manifest_list_column_gives_several_captions(tmp_path, emoji_items):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": emoji_items[0].path, "caption": ["a", "b"]}) + "\n")
    assert read_source(path)[0].captions == ("a", "b")


def test_bad_sources_are_one_sentence_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_source(tmp_path / "missing")
    with pytest.raises(UserError, match="no images"):
        read_source(tmp_path)
    (tmp_path / "m.csv").write_text("url,text\nx.png,hi\n")
    with pytest.raises(UserError, match="no image column"):
        read_source(tmp_path / "m.csv")
    with pytest.raises(UserError, match="no column 'pic'"):
        read_source(tmp_path / "m.csv", image_column="pic")
