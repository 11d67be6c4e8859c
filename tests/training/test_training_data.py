"""Training data: caption templates (training/data) and cached views (training/cache)."""


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


class _CountingTrunk:
    """A tiny locked 'trunk' (mean colour per channel, times a weight) that counts what it sees."""

    def __init__(self):
        import torch

        self.module = torch.nn.Linear(3, 4)
        self.seen = 0

    def __call__(self, pixels):
        self.seen += len(pixels)
        return self.module(pixels.float().mean(dim=(2, 3)))


def _fake_towers():
    """An encoder and TowerSplit with the shape `compute_tower_features` reads, on 8×8 pictures."""
    import contextlib
    from types import SimpleNamespace

    import torch
    import torchvision.transforms.v2 as T

    from retriever.training.cache import TowerSplit

    torch.manual_seed(0)
    image = _CountingTrunk()
    words = torch.nn.EmbeddingBag(64, 4)
    text_calls: list[int] = []

    def text_trunk(ids):
        text_calls.append(len(ids))
        return words(ids)

    def tokenizer(texts):
        return torch.tensor([[(sum(map(ord, w)) % 63) + 1 for w in (t.split() + ["."] * 4)[:4]] for t in texts])

    encoder = SimpleNamespace(
        preprocess=T.Compose([T.Resize((8, 8)), T.ToImage(), T.ToDtype(torch.float32, scale=True)]),
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        tokenizer=tokenizer,
        model=SimpleNamespace(),
        config={"preprocess_cfg": {"size": 8}},
    )
    split = TowerSplit(image, torch.nn.Identity(), text_trunk, torch.nn.Identity(), (image.module, words))
    return encoder, split, image, text_calls


def _pictures(folder, n, offset=0):
    from PIL import Image

    from retriever.data.sources import SourceItem

    folder.mkdir(exist_ok=True)
    items = []
    for i in range(offset, offset + n):
        path = folder / f"{i}.png"
        Image.new("RGB", (16, 16), (17 * i % 256, 5 * i % 256, 200)).save(path)
        items.append(SourceItem(i, str(path), (f"picture {i}", "a square")))
    return items


def test_tower_features_reuse_rows_from_other_cache_files_of_the_same_towers(tmp_path):
    """A refit on training + validation computes only the validation items: rows of the images and
    captions that other cache files in the folder hold for the same towers are reused, and the
    result equals a computation from scratch."""
    import torch

    from retriever.training.cache import compute_tower_features

    encoder, split, image, text_calls = _fake_towers()
    train, val = _pictures(tmp_path / "img", 6), _pictures(tmp_path / "img", 3, offset=6)
    cache = tmp_path / "features"
    compute_tower_features(encoder, split, train, cache_dir=cache, name="train", views=2)
    compute_tower_features(encoder, split, val, cache_dir=cache, name="val")
    assert image.seen == 6 * 2 + 3
    del text_calls[:]

    both = compute_tower_features(encoder, split, train + val, cache_dir=cache, name="train", views=2)
    # val's eval view is cached, but not its augmented view: its 3 images run again (2 views each).
    assert image.seen == 6 * 2 + 3 + 3 * 2 and not text_calls  # every caption was cached
    assert both.reused == 6
    fresh = compute_tower_features(encoder, split, train + val, views=2)
    assert torch.allclose(both.image, fresh.image) and torch.allclose(both.views, fresh.views)
    assert torch.allclose(both.text, fresh.text) and torch.equal(both.caption_start, fresh.caption_start)
    assert [it.path for it in both.items] == [it.path for it in train + val]

    # A third split in the same folder: every row is found, nothing runs.
    seen = image.seen
    del text_calls[:]
    again = compute_tower_features(encoder, split, val + train[:2], cache_dir=cache, name="val")
    assert image.seen == seen and not text_calls and again.reused == 5
    rerun = compute_tower_features(encoder, split, val + train[:2], cache_dir=cache, name="val")
    assert image.seen == seen and rerun.reused == 5 and torch.equal(rerun.image, again.image)
    assert torch.allclose(again.image, compute_tower_features(encoder, split, val + train[:2]).image)


def test_tower_features_are_recomputed_for_a_changed_file_other_towers_or_a_torn_cache(tmp_path):
    import os

    import torch
    from PIL import Image

    from retriever.training.cache import compute_tower_features

    encoder, split, image, _ = _fake_towers()
    items = _pictures(tmp_path / "img", 4)
    cache = tmp_path / "features"
    first = compute_tower_features(encoder, split, items, cache_dir=cache, name="a")
    (cache / "torn.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    # A damaged file under the split's own name is computed again, not a crash.
    (own,) = cache.glob("a-*.safetensors")
    own.write_bytes(own.read_bytes()[:100])
    seen = image.seen
    assert torch.equal(compute_tower_features(encoder, split, items, cache_dir=cache, name="a").image, first.image)
    assert image.seen == seen + 4

    Image.new("RGB", (16, 16), (0, 255, 0)).save(items[1].path)  # same path, new picture
    os.utime(items[1].path, ns=(1, 1))
    seen = image.seen
    second = compute_tower_features(encoder, split, items, cache_dir=cache, name="b")
    assert image.seen == seen + 1  # only the changed picture
    assert torch.equal(second.image[[0, 2, 3]], first.image[[0, 2, 3]])
    assert not torch.allclose(second.image[1], first.image[1])

    # Which rows a file holds is listed beside it (a safetensors header is capped at 100 MB); a
    # file whose listing is gone is no donor.
    for listing in cache.glob("*.items.json"):
        listing.unlink()
    compute_tower_features(encoder, split, items[:2], cache_dir=cache, name="d")
    assert image.seen == seen + 1 + 2
    seen += 2

    with torch.no_grad():
        image.module.weight.add_(1.0)  # other locked weights: nothing in the folder is theirs
    compute_tower_features(encoder, split, items, cache_dir=cache, name="c")
    assert image.seen == seen + 1 + 4


def test_augmented_views_depend_on_the_image_not_its_position(tmp_path):
    import torch

    from retriever.training.cache import compute_tower_features

    encoder, split, _, _ = _fake_towers()
    items = _pictures(tmp_path / "img", 4)
    a = compute_tower_features(encoder, split, items, views=3)
    b = compute_tower_features(encoder, split, items[::-1], views=3)
    assert torch.allclose(a.views, b.views.flip(0))
    assert not torch.allclose(a.views[:, 0], a.views[:, 1])


def test_the_towers_key_follows_what_shapes_trunk_outputs_not_the_heads():
    from retriever.training.cache import model_key

    encoder, split, _, _ = _fake_towers()
    base = {"embed_dim": 512, "vision_cfg": {"timm_pool": "", "timm_proj": "linear"}, "text_cfg": {}}
    encoder.config["model_cfg"] = {**base, "text_cfg": {"hf_pooler_type": "mean_pooler", "context_length": 32}}
    key = model_key(encoder, split)
    encoder.config["model_cfg"] = {**encoder.config["model_cfg"], "embed_dim": 1024}
    encoder.config["model_cfg"]["vision_cfg"] = {"timm_pool": "", "timm_proj": "mlp"}
    assert model_key(encoder, split) == key  # other heads share the cache
    for text_cfg in ({"hf_pooler_type": "cls_pooler", "context_length": 32}, {"hf_pooler_type": "mean_pooler"}):
        encoder.config["model_cfg"] = {**base, "text_cfg": text_cfg}
        assert model_key(encoder, split) != key
