"""Shared fixtures: a tiny random-init CLIP and a small real image set (Twemoji + emoji names)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Tests mean the CPU (fp32, gloo) unless a test passes a device itself: on a GPU machine the
# defaults would pick CUDA and bf16/fp16, and the bit-exact and two-process tests assume the CPU.
# Child processes (torchrun, the CLI) inherit it. RETRIEVER_DEVICE=cuda runs the suite on a GPU.
os.environ.setdefault("RETRIEVER_DEVICE", "cpu")

import pytest  # noqa: E402
import torch  # noqa: E402

ASSETS = Path(__file__).parent / "assets"
# Tests take the `tiny` fixture below; this name stays importable only so that branches written
# before the fixture existed still merge (do not import conftest in new tests).
TINY_CONFIG = str(ASSETS / "tiny-clip.json")


class TinyClip:
    """The one way tests make the tiny random-init CLIP (tests/assets/tiny-clip.json).

    `config` is the model-config path that retriever's `--model`/`TrainConfig.model` take,
    `model_cfg` its parsed content, `build()` a bare open_clip CLIP, `load()` a LoadedModel.
    """

    config = TINY_CONFIG

    @property
    def model_cfg(self) -> dict:
        return json.loads(Path(self.config).read_text())

    def build(self, seed: int = 0, **overrides):
        """A fresh open_clip CLIP in train mode, its weights drawn with `seed`."""
        from open_clip.model import CLIP

        torch.manual_seed(seed)
        return CLIP(**{**self.model_cfg, **overrides}).train()

    def load(self, pretrained: str | None = None, **kwargs):
        """`retriever.models.load.load_model` on the tiny config (random init unless `pretrained`)."""
        from retriever.models.load import load_model

        return load_model(self.config, pretrained, **kwargs)


@pytest.fixture(scope="session")
def tiny() -> TinyClip:
    return TinyClip()


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """The tiny model loaded once per session (read-only: tests that change weights build their own)."""
    return tiny.load()


@pytest.fixture(scope="session")
def emoji_items():
    from retriever.demo.emoji import emoji_collection

    # Every 25th emoji: 64+ varied images (faces, flags, objects), deterministic.
    return emoji_collection()[::25][:64]


@pytest.fixture(scope="session")
def emoji_folder(tmp_path_factory, emoji_items) -> Path:
    """64 Twemoji PNGs in nested folders, each with its name in a same-name .txt file."""
    root = tmp_path_factory.mktemp("emoji")
    for i, it in enumerate(emoji_items):
        sub = root / f"group{i % 3}"
        sub.mkdir(exist_ok=True)
        dst = sub / Path(it.path).name
        shutil.copy(it.path, dst)
        dst.with_suffix(".txt").write_text(it.captions[0] + "\n")
    return root


@pytest.fixture()
def broken_folder(tmp_path, emoji_items) -> Path:
    """A few good images plus an empty file, a truncated PNG and a text file named .jpg."""
    root = tmp_path / "broken"
    root.mkdir()
    for it in emoji_items[:6]:
        shutil.copy(it.path, root / Path(it.path).name)
    data = Path(emoji_items[0].path).read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "not-an-image.jpg").write_text("hello, I am text")
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models are all per-op overhead: a second intra-op thread gains nothing, and when the
    CI machine's cores are busy, OpenMP's spin-waiting made the recall test 12x slower (measured
    229 s vs 18 s on 2 shared cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
