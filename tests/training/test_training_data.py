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
