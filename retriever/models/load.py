"""Load an open_clip dual encoder and say exactly which weights it carries.

Three ways in, matching what users have in hand:

* a hub name and pretrained tag (`ViT-B-32` + `laion2b_s34b_b79k`), downloaded by open_clip;
* a hub name (or a model-config JSON) plus a local weights file (`.safetensors`, or a state dict
  read with `torch.load(weights_only=True)`);
* an open_clip `local-dir:` folder holding `open_clip_config.json` and safetensors weights (what
  `retriever train` writes).

Every artefact written downstream records the `ModelIdentity`, whose `weights_sha256` is a hash of
the fp32 state dict: two models produce comparable vectors only when it matches.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from retriever.errors import ModelLoadError, UserError
from retriever.identity import ModelIdentity
from retriever.models.folder import recorded_weights_sha256, state_sha256

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
RANDOM_INIT = "random"
PRECISIONS = ("fp32", "fp16", "bf16")

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """An open_clip model ready to encode, with its transforms, tokenizer and identity.

    Attributes:
        model: the open_clip CLIP-like module (eval mode, on `device`).
        preprocess: eval transform, PIL RGB image -> tensor; preprocess_train: open_clip's
            augmenting train transform.
        tokenizer: strings -> token tensor.
        identity: what the vectors are comparable with (`ModelIdentity`).
        device, precision: where and how it runs ("fp32" on the CPU; "fp16"/"bf16" autocast on a GPU).
        config: the open_clip config, {"model_cfg": ..., "preprocess_cfg": ...}.
    """

    model: Any  # an open_clip CLIP-like nn.Module; Any because open_clip is untyped (encode_image etc.)
    preprocess: Callable  # eval transform: PIL RGB image -> tensor
    preprocess_train: Callable  # open_clip's augmenting train transform
    tokenizer: Callable
    identity: ModelIdentity
    device: torch.device
    precision: str = "fp32"
    config: dict[str, Any] = field(default_factory=dict)  # {"model_cfg":..., "preprocess_cfg":...}

    @property
    def embed_dim(self) -> int:
        return self.identity.embed_dim

    def autocast(self):
        """Mixed precision for encoding; weights stay fp32 so the identity hash never changes."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when available, else CPU; an explicit choice wins, then $RETRIEVER_DEVICE (e.g. cpu)."""
    if device is None or str(device) == "auto":
        device = os.environ.get("RETRIEVER_DEVICE") or None
    if device is not None and str(device) != "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but torch sees no CUDA GPU here.")
        return dev
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """The precision to run at: fp32 on the CPU; on a GPU bf16 where it has bf16 tensor cores
    (Ampere, Hopper and later: fp32's range, so no loss scaling and no fp16 overflow), else fp16."""
    if precision is None:
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision not in PRECISIONS:
        raise UserError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if device.type == "cpu" and precision != "fp32":
        raise UserError(f"Precision {precision} needs a GPU; on the CPU retriever runs fp32.")
    return precision


def state_dict_sha256(model: torch.nn.Module) -> str:
    """Hash parameter and buffer contents (fp32, sorted by name), independent of file format."""
    return state_sha256(model.state_dict())


def load_model(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = None,
    *,
    device: str | torch.device | None = None,
    precision: str | None = None,
) -> LoadedModel:
    """Build an open_clip model from a hub name, a config JSON, or a `local-dir:` folder.

    `pretrained` is a tag (`laion2b_s34b_b79k`), a local weights file, or `"random"`. With the
    default hub model and no `pretrained`, the default tag is used; a config JSON without
    `pretrained` is randomly (but reproducibly, seed 0) initialised, which is what tests use.

    Args:
        model: open_clip hub name, model-config JSON path, or `local-dir:FOLDER` (open_clip files).
        pretrained: see above; must be None for a `local-dir:` folder (it holds the weights).
        device: "cuda" or "cpu"; default: cuda when torch sees a GPU.
        precision: "fp32" (CPU), "fp16" or "bf16" (GPU autocast; default fp16 there).
    """
    import open_clip

    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    name, pretrained, config = _resolve_spec(model, pretrained)

    random_init = pretrained in (None, RANDOM_INIT) and not name.startswith("local-dir:")
    kwargs: dict[str, Any] = {}
    if config.get("preprocess_cfg") and not name.startswith("local-dir:"):  # open_clip reads a folder's itself
        pp = config["preprocess_cfg"]
        for key in ("mean", "std", "interpolation", "resize_mode"):
            if pp.get(key) is not None:
                kwargs[f"image_{key}"] = tuple(pp[key]) if isinstance(pp[key], list) else pp[key]
    arch = config.get("_registered_name", name)
    try:
        # Seeded so that a random-init model is the same model every time it is loaded.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net, pre_train, pre_val = open_clip.create_model_and_transforms(
                arch,
                pretrained=None if random_init else pretrained,
                device="cpu",
                precision="fp32",
                **kwargs,
            )
        tokenizer = open_clip.get_tokenizer(arch)
    except FileNotFoundError as e:
        raise ModelLoadError(f"Could not load model {name!r}: {e}.") from e
    except RuntimeError as e:
        if "download" in str(e).lower():
            raise ModelLoadError(_download_failed_message(name, pretrained)) from e
        raise ModelLoadError(f"Could not load model {name!r} with weights {pretrained!r}: {e}") from e

    net.eval()
    identity = ModelIdentity(
        name=name,
        pretrained=None if random_init and pretrained is None else pretrained,
        weights_sha256=_weights_sha256(name, net),
        embed_dim=_embed_dim(net, config),
    )
    net.to(dev)
    if dev.type == "cuda":
        enable_tf32()
    return LoadedModel(net, pre_val, pre_train, tokenizer, identity, dev, prec, config)


def _weights_sha256(name: str, net: torch.nn.Module) -> str:
    """The recorded hash of a retriever-written folder whose weights file is unchanged, else a full hash."""
    if name.startswith("local-dir:"):
        recorded = recorded_weights_sha256(name.removeprefix("local-dir:"))
        if recorded is not None:
            return recorded
    return state_dict_sha256(net)


def enable_tf32() -> None:
    """Let float32 matmuls and convolutions on CUDA use TF32 tensor cores (Ampere and later).

    Process-wide, called when a model is loaded onto a GPU: the fp32 parts of a mixed-precision
    run (and --precision fp32) then run ~8x faster on tensor cores, with float32 range and a
    10-bit mantissa in the products, which embeddings and training tolerate. Weights and the
    identity hash are unchanged.
    """
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):  # torch ≥ 2.9
        matmul.fp32_precision = "tf32"
        conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def model_config_of(model: str) -> dict[str, Any]:
    """The open_clip config ({"model_cfg", "preprocess_cfg"}) for a hub name, JSON path or folder."""
    _, _, config = _resolve_spec(model, RANDOM_INIT)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _resolve_spec(model: str, pretrained: str | None) -> tuple[str, str | None, dict[str, Any]]:
    """Normalise the user's model/pretrained pair; returns (name, pretrained, config)."""
    import open_clip

    model = str(model)
    path = Path(model.removeprefix("local-dir:")).expanduser()
    if model.startswith("local-dir:") or (path.is_dir() and (path / "open_clip_config.json").is_file()):
        if not (path / "open_clip_config.json").is_file():
            raise ModelLoadError(
                f"{path} is not an open_clip model folder: it needs open_clip_config.json and weights "
                "(open_clip_model.safetensors)."
            )
        if pretrained not in (None, RANDOM_INIT):
            raise UserError("--pretrained cannot be combined with a local-dir: model; the folder holds the weights.")
        config = json.loads((path / "open_clip_config.json").read_text())
        return f"local-dir:{path.resolve()}", None, config

    if model.endswith(".json"):
        if not path.is_file():
            raise UserError(f"Model config file {path} does not exist.")
        raw = json.loads(path.read_text())
        config = raw if "model_cfg" in raw else {"model_cfg": raw}
        if not all(k in config["model_cfg"] for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise UserError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg).")
        config["_registered_name"] = _register_config(config["model_cfg"])
        return str(path.resolve()), _resolve_weights_arg(pretrained), config

    if path.suffix in (".safetensors", ".pt", ".pth", ".bin") or path.is_dir():
        raise UserError(
            f"{model} looks like weights, not a model name: pass it as --pretrained with --model NAME, "
            "or pass a folder with open_clip_config.json as --model local-dir:FOLDER."
        )

    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise UserError(
            f"Unknown model {model!r}: give an open_clip model name (see open_clip.list_models()), "
            "a model-config JSON file, or local-dir:FOLDER."
        )
    if pretrained is None:
        if model != DEFAULT_MODEL:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
            raise UserError(
                f"Model {model} needs --pretrained: a tag (known: {tags}), a local weights file, "
                "or 'random' for random initialisation."
            )
        pretrained = DEFAULT_PRETRAINED
    pretrained = _resolve_weights_arg(pretrained)
    if pretrained not in (None, RANDOM_INIT) and not Path(pretrained).is_file():
        _check_tag_downloadable(model, pretrained)
    return model, pretrained, {"model_cfg": cfg}


def _resolve_weights_arg(pretrained: str | None) -> str | None:
    if pretrained in (None, RANDOM_INIT):
        return pretrained
    p = Path(pretrained).expanduser()
    if p.suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt") or os.sep in pretrained:
        if not p.is_file():
            raise UserError(f"Weights file {p} does not exist.")
        return str(p.resolve())
    return pretrained


def _check_tag_downloadable(model: str, tag: str) -> None:
    """Fail in a second, not after a minute of retries, when the weights cannot be fetched."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(model, tag)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        raise UserError(f"{tag!r} is neither a known pretrained tag for {model} (known: {tags}) nor a file.")
    if _in_hf_cache(cfg) or any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY")):
        return
    host = urlparse(cfg["url"]).hostname if cfg.get("url") and not cfg.get("hf_hub") else "huggingface.co"
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        raise ModelLoadError(_download_failed_message(model, tag)) from None


def _in_hf_cache(cfg: dict[str, Any]) -> bool:
    repo = (cfg.get("hf_hub") or "").strip("/")
    if not repo:
        return False
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_pytorch_model.safetensors"):
        if isinstance(try_to_load_from_cache(repo, fname), str):
            return True
    return False


def _download_failed_message(model: str, pretrained: str | None) -> str:
    return (
        f"Could not download the {pretrained!r} weights for {model} (no network access?); "
        f"download them elsewhere and pass a local checkpoint: --model {model} --pretrained PATH/TO/weights.safetensors, "
        "or --model local-dir:FOLDER for a folder with open_clip_config.json and weights."
    )


def _register_config(model_cfg: dict[str, Any]) -> str:
    """Make a config JSON known to open_clip under a content-derived name (public API only)."""
    import open_clip

    digest = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:16]
    name = f"retriever-cfg-{digest}"
    if open_clip.get_model_config(name) is None:
        folder = model_config_dir()
        target = folder / f"{name}.json"
        text = json.dumps(model_cfg)
        # Rewritten unless it already holds exactly this config: never trust a file we did not just check.
        if target.is_symlink() or not target.is_file() or target.read_text() != text:
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            tmp.write_text(text)
            os.replace(tmp, target)
        open_clip.add_model_config(target)
    return name


def model_config_dir() -> Path:
    """A per-user folder for generated model configs: $XDG_CACHE_HOME/retriever/model-configs.

    Not a fixed name under /tmp (issue 10): there another local user could plant a config or a
    symlink under the predictable name before we write it.
    """
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "retriever" / "model-configs"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home (a service account): a private temp folder of our own
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="retriever-model-configs-"))
    return folder


def _embed_dim(net: Any, config: dict[str, Any]) -> int:
    dim = config.get("model_cfg", {}).get("embed_dim")
    if dim is None:
        dim = getattr(net, "embed_dim", None) or net.text_projection.shape[-1]
    return int(dim)
