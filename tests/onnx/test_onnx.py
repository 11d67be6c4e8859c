"""ONNX towers: exports verified against torch, the torch-free runtime, and the search fallback."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONFIG

from retriever.errors import UserError
from retriever.onnx import EXPORT_JSON, IMAGE_FILE, TEXT_FILE


@pytest.fixture(autouse=True)
def private_export_cache(tmp_path, monkeypatch):
    """Searches also look in the export cache (~/.cache/retriever/onnx): keep this machine's out."""
    monkeypatch.setenv("RETRIEVER_ONNX_CACHE", str(tmp_path / "onnx-cache"))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_model):
    from retriever.onnx.export import export_onnx

    folder = tmp_path_factory.mktemp("onnx") / "tiny"
    info = export_onnx(tiny_model, folder)
    return folder, info


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory, tiny_model, emoji_folder, tiny_export):
    """An index of the 64 emoji by the tiny model, with its export in INDEX/onnx."""
    from retriever.data.sources import read_source
    from retriever.embed import EmbedConfig, embed_items
    from retriever.indexes import build_index

    tmp = tmp_path_factory.mktemp("onnx-index")
    embed_items(read_source(emoji_folder), tiny_model, tmp / "shards", EmbedConfig(num_workers=0))
    build_index(tmp / "shards", tmp / "index")
    shutil.copytree(tiny_export[0], tmp / "index" / "onnx")
    return tmp / "index"


def _strings(n: int = 2000) -> list[str]:
    """Emoji names plus random strings over ASCII, accents, CJK, emoji and HTML entities."""
    import emoji

    names = [d["en"].strip(":").replace("_", " ") for d in list(emoji.EMOJI_DATA.values())[::7]][: n // 2]
    rng = random.Random(0)
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,!?'-&;#:")
        + list("éüßçñ日本語中文한국어🐶❤️👍🏽")
        + [
            "&amp;",
            "&lt;",
            "'s",
            "'ll",
            "\t",
            "\n",
        ]
    )
    rand = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n - len(names))]
    return names + rand + ["", " ", "a" * 300, "word " * 100]


def test_clip_bpe_matches_open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    from retriever.onnx.runtime import ClipBpeTokenizer

    strings = _strings()
    for context, some in ((77, strings), (16, strings[::4])):
        ours = ClipBpeTokenizer(default_bpe(), context)(some)
        theirs = SimpleTokenizer(context_length=context)(some).numpy()
        bad = [s for s, a, b in zip(some, ours, theirs) if not np.array_equal(a, b)]
        assert not bad, bad[:3]


def test_tiny_export_is_verified_and_complete(tiny_export, tiny_model):
    folder, info = tiny_export
    assert {p.name for p in folder.iterdir()} == {EXPORT_JSON, TEXT_FILE, IMAGE_FILE, "bpe_simple_vocab_16e6.txt.gz"}
    on_disk = json.loads((folder / EXPORT_JSON).read_text())
    assert on_disk["identity"]["weights_sha256"] == tiny_model.identity.weights_sha256
    assert on_disk["opset"] >= 17
    assert on_disk["text"]["tokenizer"] == {
        "kind": "clip_bpe",
        "files": ["bpe_simple_vocab_16e6.txt.gz"],
        "context_length": 16,
        "clean": "lower",
    }
    pp = on_disk["image"]["preprocess"]
    assert pp["size"] == [32, 32] and pp["resize_mode"] == "shortest" and pp["interpolation"] == "bicubic"
    v = info["verified"]
    assert v["text_max_abs_diff"] <= 1e-5 and v["image_max_abs_diff"] <= 1e-5 and v["pixel_max_abs_diff"] <= 1e-5
    # open_clip's own text transformer adds its whole positional table: its graph keeps the length.
    assert on_disk["text"]["dynamic_length"] is False


def test_onnx_encoder_matches_torch_on_real_images_and_batches(tiny_export, tiny_model, emoji_items):
    from retriever.models.encode import encode_images, encode_texts
    from retriever.onnx.runtime import OnnxEncoder

    enc = OnnxEncoder(tiny_export[0], tiny_model.identity)
    paths = [it.path for it in emoji_items[:20]]  # RGBA PNGs: alpha goes onto white on both paths
    a, b = enc.encode_images(paths, batch_size=7), encode_images(tiny_model, paths, batch_size=7)
    assert a.shape == b.shape == (20, 32) and a.dtype == np.float32
    assert np.abs(a - b).max() <= 1e-5
    texts = [it.captions[0] for it in emoji_items]
    assert np.abs(enc.encode_texts(texts, batch_size=5) - encode_texts(tiny_model, texts)).max() <= 1e-5
    assert enc.encode_texts([]).shape == (0, 32)


def test_failed_verification_writes_nothing(tiny_model, tiny_export, tmp_path):
    from retriever.onnx.export import ExportError, export_onnx

    target = tmp_path / "exp"
    shutil.copytree(tiny_export[0], target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(ExportError, match="differ from torch"):
        export_onnx(tiny_model, target, tolerance=-1.0)  # nothing can pass: the export must be refused
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["exp"]  # no temp folder left behind
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not an ONNX export folder"):
        export_onnx(tiny_model, tmp_path / "other")


def test_search_uses_onnx_and_matches_torch(tiny_index, emoji_items):
    from retriever.search import Retriever

    r_onnx, r_torch = Retriever(tiny_index), Retriever(tiny_index, backend="torch")
    for q in ({"text": emoji_items[3].captions[0]}, {"image": emoji_items[10].path}):
        a, b = r_onnx.search(**q, k=10), r_torch.search(**q, k=10)
        assert [h.id for h in a] == [h.id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    assert r_onnx.query_encoder.backend == "onnx" and r_onnx.query_encoder.note is None
    assert r_torch.query_encoder.backend == "torch"


def _break(folder: Path, how: str) -> None:
    info = json.loads((folder / EXPORT_JSON).read_text())
    text = folder / TEXT_FILE
    if how == "truncated":
        text.write_bytes(text.read_bytes()[:1000])
    elif how == "corrupt":
        data = bytearray(text.read_bytes())
        data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64
        text.write_bytes(bytes(data))
    elif how == "other-model":
        info["identity"]["weights_sha256"] = "0" * 64
    elif how == "no-tokenizer":
        (folder / "bpe_simple_vocab_16e6.txt.gz").unlink()
    elif how == "unloadable":  # recorded hash matches, but onnxruntime cannot parse the file
        import hashlib

        text.write_bytes(b"not a protobuf at all" * 100)
        info["text"].update(bytes=text.stat().st_size, sha256=hashlib.sha256(text.read_bytes()).hexdigest())
    (folder / EXPORT_JSON).write_text(json.dumps(info))


@pytest.mark.parametrize(
    "how, says",
    [
        ("truncated", "truncated"),
        ("corrupt", "corrupt"),
        ("other-model", "another model"),
        ("no-tokenizer", "tokenizer file"),
        ("unloadable", "cannot load"),
    ],
)
def test_bad_export_falls_back_to_torch_with_one_line(tiny_index, tmp_path, emoji_items, how, says):
    from retriever.search import Retriever

    index = tmp_path / "index"
    shutil.copytree(tiny_index, index)
    _break(index / "onnx", how)
    before = {p.name: p.read_bytes() for p in (index / "onnx").iterdir()}
    r = Retriever(index)
    hits = r.search(text=emoji_items[3].captions[0], k=3, modality="text")
    assert hits[0].caption == emoji_items[3].captions[0]
    assert r.query_encoder.backend == "torch"
    note = r.query_encoder.note
    assert says in note and note.startswith("Using torch for queries") and "\n" not in note
    with pytest.raises(UserError, match="--backend onnx"):
        Retriever(index, backend="onnx").search(text="a dog", k=3)
    assert {p.name: p.read_bytes() for p in (index / "onnx").iterdir()} == before  # nothing overwritten


def test_no_export_falls_back_and_explicit_onnx_errors(tiny_index, tmp_path):
    from retriever.search import Retriever

    index = tmp_path / "index"
    shutil.copytree(tiny_index, index, ignore=shutil.ignore_patterns("onnx"))
    r = Retriever(index)
    r.search(text="a dog", k=2)
    assert r.query_encoder.backend == "torch" and "no ONNX export" in r.query_encoder.note
    with pytest.raises(UserError, match="export-onnx"):
        Retriever(index, backend="onnx").search(text="a dog", k=2)


_NO_TORCH_SEARCH = """
import json, sys
from retriever.cli.app import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    heavy = sorted(m for m in ("torch", "open_clip", "transformers", "torchvision", "timm") if m in sys.modules)
    print("HEAVY=" + json.dumps(heavy))
"""


@pytest.mark.parametrize("query", ["text", "image"])
def test_cli_search_in_fresh_process_imports_no_torch(tiny_index, emoji_items, query):
    # --keep-query: the query image itself is the expected best hit (left out of results by default)
    args = (
        [emoji_items[3].captions[0], "--modality", "text"]
        if query == "text"
        else ["--image", emoji_items[10].path, "--keep-query"]
    )
    res = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SEARCH, "search", str(tiny_index), *args, "-k", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[2],
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "HEAVY=[]", lines[-1]
    hits = json.loads("\n".join(lines[:-1]))["hits"]
    if query == "text":
        assert hits[0]["caption"] == emoji_items[3].captions[0]
    else:
        assert Path(hits[0]["path"]).name == Path(emoji_items[10].path).name and hits[0]["score"] > 0.999


def test_cli_export_onnx_and_index_auto_export(tmp_path, tiny_index):
    from typer.testing import CliRunner

    from retriever.cli.app import app

    runner = CliRunner()
    res = runner.invoke(app, ["export-onnx", TINY_CONFIG, "--out", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "exp" / EXPORT_JSON).is_file() and "max abs diff" in res.output
    shards = tiny_index.parent / "shards"
    res = runner.invoke(app, ["index", str(shards), "--out", str(tmp_path / "i1"), "--no-onnx"])
    assert res.exit_code == 0 and not (tmp_path / "i1" / "onnx").exists()
    res = runner.invoke(app, ["index", str(shards), "--out", str(tmp_path / "i2")])
    assert res.exit_code == 0, res.output
    from retriever.onnx.runtime import OnnxEncoder

    OnnxEncoder(tmp_path / "i2" / "onnx").load()
    before = (tmp_path / "i2" / "onnx" / TEXT_FILE).stat().st_ino
    res = runner.invoke(app, ["index", "--add", str(shards), str(tmp_path / "i2"), "--renumber"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "i2" / "onnx" / TEXT_FILE).stat().st_ino == before  # carried over (linked), not re-exported
    assert "Exported" not in res.output


def test_composed_hf_tower_export_from_local_dir(tmp_path):
    """timm trunk + MiniLM text tower (the demo's recipe, smaller image tower) saved as local-dir."""
    from retriever.models.compose import build_composed_model, default_tower_paths
    from retriever.models.folder import write_model_files
    from retriever.models.load import load_model
    from retriever.onnx.export import export_onnx
    from retriever.onnx.runtime import OnnxEncoder

    _, text_dir = default_tower_paths()
    model, config = build_composed_model(
        "timm:tf_efficientnet_lite0", f"hf:{text_dir}", image_size=64, context_length=16, embed_dim=32
    )
    (tmp_path / "model").mkdir()
    write_model_files(tmp_path / "model", model, config)
    encoder = load_model(f"local-dir:{tmp_path / 'model'}")
    info = export_onnx(encoder, tmp_path / "model" / "onnx")
    assert info["text"]["tokenizer"]["kind"] == "hf" and info["text"]["tokenizer"]["context_length"] == 16
    assert info["verified"]["text_max_abs_diff"] <= 1e-5 and info["verified"]["image_max_abs_diff"] <= 1e-5
    # An HF tower masks its padding: the export takes any length and the runtime drops unused padding.
    assert info["text"]["dynamic_length"] is True
    from retriever.onnx.choose import find_onnx_encoder

    found, why = find_onnx_encoder(None, encoder.identity)  # found in the model folder's onnx/
    assert why is None and isinstance(found, OnnxEncoder)
    assert found.encode_texts(["a red heart"]).shape == (1, 32)
    seen = []
    session = found._session("text")
    found._sessions["text"] = type("Spy", (), {"get_inputs": session.get_inputs,
                                               "run": lambda self, o, feed: seen.append(feed) or session.run(o, feed)})()  # fmt: skip
    alone, together = found.encode_texts(["a red heart"]), found.encode_texts(["a red heart", "x " * 40])
    assert [f["tokens"].shape[1] for f in seen] == [5, 16]  # [CLS] a red heart [SEP]; the long one fills 16
    np.testing.assert_allclose(alone[0], together[0], atol=1e-6)


def test_embed_on_onnx_matches_torch_shards(tiny_model, tiny_export, emoji_folder, tmp_path):
    import pyarrow.parquet as pq

    from retriever.data.sources import read_source
    from retriever.embed import EmbedConfig, embed_items
    from retriever.onnx.backend import choose_embed_backend
    from retriever.onnx.runtime import OnnxEncoder

    onnx, why = choose_embed_backend(tiny_model, "auto", 8, 64)
    assert onnx is None and "torch" in why  # no export anywhere and a small job: not worth one
    assert choose_embed_backend(tiny_model, "torch", 8, 64) == (None, None)
    onnx, why = choose_embed_backend(tiny_model, "onnx", 8, 64)  # exports into the cache
    assert isinstance(onnx, OnnxEncoder) and "onnxruntime" in why
    from retriever.onnx.choose import find_onnx_encoder

    assert find_onnx_encoder(None, tiny_model.identity)[0] is not None  # and searches find it there
    onnx, why = choose_embed_backend(tiny_model, "auto", 8, 64)  # now measured on one batch
    assert why.startswith("Embedding with ") and "ms on onnxruntime" in why

    items = read_source(emoji_folder)
    cfg = EmbedConfig(num_workers=0, batch_size=8)
    embed_items(items, tiny_model, tmp_path / "t", cfg)
    embed_items(items, tiny_model, tmp_path / "o", cfg, onnx=OnnxEncoder(tiny_export[0]))
    a, b = pq.read_table(tmp_path / "t"), pq.read_table(tmp_path / "o")
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    for col in ("image_embedding", "text_embedding"):
        assert np.abs(np.array(a.column(col).to_pylist()) - np.array(b.column(col).to_pylist())).max() <= 1e-5


_NO_TORCH_SERVE = """
import json, sys
from pathlib import Path
from fastapi.testclient import TestClient
from retriever.serve.app import ServeConfig, create_app

index, caption, image = sys.argv[1:4]
with TestClient(create_app(ServeConfig(indexes=[("emoji", Path(index))], watch_seconds=0))) as c:
    text = c.post("/v1/search", json={"index": "emoji", "text": caption, "modality": "text", "k": 3}).json()
    with open(image, "rb") as f:
        up = c.post("/v1/search/image", files={"file": ("q.png", f, "image/png")}, data={"index": "emoji"}).json()
heavy = sorted(m for m in ("torch", "open_clip", "transformers", "torchvision", "timm") if m in sys.modules)
print(json.dumps({"text": text, "image": up, "heavy": heavy}))
"""


def test_server_answers_text_and_image_queries_without_torch(tiny_index, emoji_items):
    res = subprocess.run(
        [sys.executable, "-c", _NO_TORCH_SERVE, str(tiny_index), emoji_items[3].captions[0], emoji_items[10].path],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=Path(__file__).parents[2],
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    assert out["text"]["hits"][0]["caption"] == emoji_items[3].captions[0]
    top = out["image"]["hits"][0]  # the server shows no paths: the same image comes back by its caption
    assert top["caption"] == emoji_items[10].captions[0] and top["score"] > 0.999
