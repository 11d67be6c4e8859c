"""The second demo domain: Font Awesome icons (demo/icons) and its run (demo/domain)."""

import pytest

from retriever.errors import UserError


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
