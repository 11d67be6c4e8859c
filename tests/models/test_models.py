import copy
import json
import socket
import time

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from retriever.errors import ModelLoadError, UserError
from retriever.models.encode import encode_images, encode_texts
from retriever.models.load import load_model, state_dict_sha256


def test_random_init_config_is_reproducible(tiny, tiny_model):
    again = tiny.load()
    assert again.identity == tiny_model.identity
    assert again.identity.embed_dim == 32 and again.identity.pretrained is None
    assert tiny_model.device.type in ("cpu", "cuda")


def test_encoders_return_unit_float32(tiny_model, emoji_items):
    img = encode_images(tiny_model, [it.path for it in emoji_items[:3]], batch_size=2)
    txt = encode_texts(tiny_model, ["a cat", "a dog"])
    for v, n in ((img, 3), (txt, 2)):
        assert v.dtype == np.float32 and v.shape == (n, 32)
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    # bytes and paths give the same vector
    raw = open(emoji_items[0].path, "rb").read()
    np.testing.assert_allclose(encode_images(tiny_model, [raw])[0], img[0], atol=1e-6)


def _perturbed_state(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }


def test_local_weights_file_safetensors_and_torch(tiny, tmp_path, tiny_model):
    state = {k: v.contiguous() for k, v in _perturbed_state(tiny_model.model).items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    a = tiny.load(str(tmp_path / "w.safetensors"))
    b = tiny.load(str(tmp_path / "w.pt"))
    assert a.identity.weights_sha256 == b.identity.weights_sha256 != tiny_model.identity.weights_sha256
    assert a.identity.pretrained == str(tmp_path / "w.safetensors")


def test_local_dir_folder(tiny, tmp_path, tiny_model):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    cfg = tiny.model_cfg
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    save_file(
        {k: v.contiguous() for k, v in tiny_model.model.state_dict().items()}, folder / "open_clip_model.safetensors"
    )
    encoder = load_model(f"local-dir:{folder}")
    assert encoder.identity.weights_sha256 == tiny_model.identity.weights_sha256
    assert encoder.identity.name == f"local-dir:{folder.resolve()}"
    # the bare folder path works too
    assert load_model(str(folder)).identity == encoder.identity


def test_state_hash_ignores_storage_format_but_not_values(tiny, tiny_model):
    assert state_dict_sha256(tiny_model.model) == tiny_model.identity.weights_sha256
    model = tiny.build()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())  # values that fp16 holds exactly, stored as fp32
    fp32_hash = state_dict_sha256(model)
    half = copy.deepcopy(model).half()
    assert next(half.parameters()).dtype == torch.float16
    assert state_dict_sha256(half) == fp32_hash  # same values, other storage: same hash
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0
    assert state_dict_sha256(model) != fp32_hash  # one changed value: another hash


def test_unknown_and_misplaced_models_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="Unknown model"):
        load_model("NoSuchNet-7")
    with pytest.raises(UserError, match="does not exist"):
        load_model(str(tmp_path / "missing.json"))
    with pytest.raises(UserError, match="needs --pretrained"):
        load_model("RN50")
    (tmp_path / "w.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="looks like weights"):
        load_model(str(tmp_path / "w.safetensors"))


def test_failed_download_says_how_to_pass_a_local_checkpoint(monkeypatch):
    def no_dns(*a, **k):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError) as e:
        load_model("ViT-B-32", "laion2b_s34b_b79k")
    assert time.perf_counter() - t0 < 10  # no minute of retries
    msg = str(e.value)
    assert "Could not download" in msg and "--pretrained" in msg and "local-dir:" in msg


def test_cpu_refuses_half_precision(tiny):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    with pytest.raises(UserError, match="needs a GPU"):
        tiny.load(precision="fp16")


def test_folder_weights_hash_is_recorded_and_trusted_only_while_the_file_is_unchanged(tmp_path, tiny, monkeypatch):
    from retriever.models import load as load_module
    from retriever.models.folder import WEIGHTS_FILE, write_model_files

    model = tiny.build(seed=3).eval()
    folder = tmp_path / "m"
    folder.mkdir()
    write_model_files(folder, model, {"model_cfg": tiny.model_cfg, "preprocess_cfg": {}})
    full = state_dict_sha256(model)

    def no_full_hash(net):
        raise AssertionError("hashed every parameter although the folder records the hash")

    with monkeypatch.context() as m:
        m.setattr(load_module, "state_dict_sha256", no_full_hash)
        assert load_model(f"local-dir:{folder}").identity.weights_sha256 == full

    # Other weights in the file (same size): the record no longer describes it, so the hash is recomputed.
    state = {k: v.contiguous().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        next(iter(v for v in state.values() if v.is_floating_point())).view(-1)[0] += 1.0
    save_file(state, folder / WEIGHTS_FILE)
    reloaded = load_model(f"local-dir:{folder}")
    assert reloaded.identity.weights_sha256 == state_dict_sha256(reloaded.model) != full
