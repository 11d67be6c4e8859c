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


def test_caption_templates_expand_every_caption_once():
    from retriever.data.sources import SourceItem
    from retriever.training.data import with_templates

    items = [SourceItem(0, "a.png", ("red heart", "love")), SourceItem(1, "b.png", ("cat",))]
    out = with_templates(items, ["{}", "an icon of {}", "{}"])
    assert out[0].captions == ("red heart", "an icon of red heart", "love", "an icon of love")
    assert out[1].captions == ("cat", "an icon of cat") and out[1].path == "b.png"
    assert with_templates(items, []) == items


def test_cached_views_are_drawn_by_seed_and_geometric_views_are_seeded():
    import torch
    from PIL import Image

    from retriever.training.cache import CachedSplit, geometric_view

    image = torch.arange(6.0).reshape(3, 2)
    views = image[:, None, :] + torch.tensor([100.0, 200.0])[None, :, None]  # (3, 2 views, 2)
    split = CachedSplit([], image, torch.zeros(3, 2), torch.arange(3), 0, views)
    rows = split.image_rows([0, 1, 2], [3, 4, 5])  # draws mod 3 views: eval, view 1, view 2
    assert torch.equal(rows, torch.stack([image[0], views[1, 0], views[2, 1]]))
    assert torch.equal(CachedSplit([], image, image, torch.arange(3), 0).image_rows([2, 0], [1, 1]), image[[2, 0]])

    img = Image.new("RGB", (72, 72), "white")
    img.paste((255, 0, 0), (20, 20, 50, 50))
    a, b, c = geometric_view(img, 1), geometric_view(img, 1), geometric_view(img, 2)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes() and a.size == img.size
    # No colour change: the view holds only the picture's own colours (up to interpolation).
    px = torch.from_numpy(__import__("numpy").asarray(a).astype("int64"))
    r, g, bl = px[..., 0], px[..., 1], px[..., 2]
    assert int(((r < 200) & ((g > 60) | (bl > 60))).sum()) == 0 and int((g != bl).sum()) == 0


def test_fontawesome_icons_render_with_label_and_search_terms(tmp_path):
    import numpy as np
    from PIL import Image

    icons = pytest.importorskip("retriever.demo.icons")
    try:
        items = icons.fontawesome_collection(tmp_path / "png")
    except UserError as e:
        pytest.skip(str(e))
    assert len(items) == 1002  # every solid-style icon of Font Awesome Free 5.15.4
    by_name = {it.char: it for it in items}
    camera = by_name["camera-retro"]
    assert camera.captions[0] == "retro camera" and "photo" in camera.captions
    px = np.asarray(Image.open(camera.path))
    assert px.shape == (96, 96, 3) and (px < 128).mean() > 0.1 and (px > 250).mean() > 0.3  # a glyph on white
    again = icons.fontawesome_collection(tmp_path / "png")  # rendered once, then reused
    assert [it.captions for it in again] == [it.captions for it in items]


def test_domain_demo_needs_the_demo_model_first(tmp_path):
    from retriever.demo.domain import run_domain_demo

    with pytest.raises(UserError, match="run `retriever demo"):
        run_domain_demo(tmp_path / "empty")
    with pytest.raises(UserError, match="Unknown --domain"):
        run_domain_demo(tmp_path, "flags")
