"""Export a loaded model's towers to ONNX, verified against torch before anything is written.

`export_onnx(encoder, out_dir)` writes, into a temporary sibling folder that replaces `out_dir`
only once everything checks out (retriever.atomic.atomic_dir):

* `text.onnx`: int64 token ids (N, L) -> (N, D) L2-normalised float32 embeddings, for any
  L <= context_length (`dynamic_length`: the runtime drops the padding columns a batch does not
  use, so short queries cost a fraction of a full-length pass, and the result is the same);
* `image.onnx`: preprocessed pixels (N, 3, H, W) -> (N, D) L2-normalised float32 embeddings;
* the tokenizer files (CLIP's BPE merges, or an HF tower's tokenizer.json);
* `export.json`: the model identity (weights SHA-256), each file's size and SHA-256, the
  tokenizer kind / files / context length / cleaning, and the image preprocessing (size, resize
  mode, crop fill, mean/std, interpolation) the torch-free runtime needs.

Verification runs the *runtime* (retriever.onnx.runtime, the code queries will use) on sample
strings and images and compares with the torch path: identical token ids, preprocessed pixels and
embeddings within `tolerance` (1e-5 max abs, fp32). An export that disagrees is refused and the
previous folder, if any, is left as it was.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retriever.atomic import atomic_dir
from retriever.errors import UserError
from retriever.models.load import LoadedModel
from retriever.onnx import EXPORT_JSON, FORMAT_VERSION, IMAGE_FILE, TEXT_FILE

OPSET = 18
TOLERANCE = 1e-5

# Varied on purpose: cases, punctuation, HTML entities, accents, CJK, emoji, digits, and one far
# longer than any context length (truncation must keep the end-of-text token).
SAMPLE_TEXTS = [
    "a red heart",
    "A photo of a DOG, running on the beach!",
    "smiling face with heart-eyes &amp; sunglasses",
    "  extra   spaces\tand\nnewlines  ",
    "café naïve résumé",
    "日本語のテキスト",
    "🐶 dog face 🐕",
    "flag: Bosnia & Herzegovina",
    "it's 3 o'clock, we've 42 cats",
    "",
    " ".join(f"word{i}" for i in range(120)),
]


class ExportError(UserError):
    """The model cannot be exported, or its export disagrees with torch."""


class _TextTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_text(tokens).float()  # type: ignore[operator]
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # as models/encode.py


class _ImageTower(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        feats = self.model.encode_image(pixels).float()  # type: ignore[operator]
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# What the runtime needs to know
# --------------------------------------------------------------------------------------------


def tokenizer_spec(encoder: LoadedModel, folder: Path) -> dict[str, Any]:
    """Copy the tokenizer's files into `folder` and describe it for the runtime."""
    tok: Any = encoder.tokenizer  # open_clip's SimpleTokenizer or HFTokenizer
    text_cfg = encoder.config.get("model_cfg", {}).get("text_cfg", {})
    kwargs = text_cfg.get("tokenizer_kwargs", {}) or {}
    kind = type(tok).__name__
    if kind == "SimpleTokenizer":
        from open_clip.tokenizer import default_bpe

        if tok.reduction_fn is not None or len(tok.all_special_ids) != 2:
            raise ExportError(
                "This model's CLIP tokenizer uses options (reduction masks, extra special tokens) that the ONNX runtime does not reproduce."
            )
        shutil.copyfile(default_bpe(), folder / "bpe_simple_vocab_16e6.txt.gz")
        return {
            "kind": "clip_bpe",
            "files": ["bpe_simple_vocab_16e6.txt.gz"],
            "context_length": int(tok.context_length),
            "clean": kwargs.get("clean", "lower"),
        }
    if kind == "HFTokenizer":
        if tok.tokenizer_mode or tok.strip_sep_token:
            raise ExportError("This model's HF tokenizer mode is not one the ONNX runtime reproduces.")
        backend = getattr(tok.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ExportError("This model's HF tokenizer has no fast (tokenizers-library) version to export.")
        backend = copy.deepcopy(backend)
        backend.no_padding()
        backend.no_truncation()
        backend.save(str(folder / "tokenizer.json"))
        return {
            "kind": "hf",
            "files": ["tokenizer.json"],
            "context_length": int(tok.context_length),
            "clean": kwargs.get("clean", "whitespace"),
            "pad_id": int(tok.tokenizer.pad_token_id or 0),
        }
    raise ExportError(f"The ONNX runtime has no torch-free version of the {kind} tokenizer this model uses.")


def preprocess_spec(encoder: LoadedModel) -> dict[str, Any]:
    """Size, resize mode, fill, mean/std and interpolation of the model's eval transform."""
    import open_clip

    cfg = dict(open_clip.get_model_preprocess_cfg(encoder.model) or {})
    # The transform embedding actually runs is the ground truth for mean/std and interpolation.
    for t in getattr(encoder.preprocess, "transforms", []):
        name = type(t).__name__
        if name == "Normalize":
            cfg["mean"], cfg["std"] = list(t.mean), list(t.std)
        elif name in ("Resize", "ResizeKeepRatio") and "interp_seen" not in cfg:
            cfg["interpolation"] = str(getattr(t.interpolation, "value", t.interpolation))
            cfg["interp_seen"] = True
    cfg.pop("interp_seen", None)
    size = cfg.get("size", 224)
    size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(s) for s in size]
    return {
        "size": size,
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "mean": [float(v) for v in cfg["mean"]],
        "std": [float(v) for v in cfg["std"]],
        "fill_color": int(cfg.get("fill_color", 0) or 0),
    }


def sample_images(size: list[int], seed: int = 0) -> list[Image.Image]:
    """Smooth random pictures of the model's size, a wide one, a tall one and a tiny one."""
    rng = np.random.default_rng(seed)
    h, w = size
    shapes = [(w, h), (int(w * 1.6) + 3, h + 5), (w // 2 + 1, int(h * 1.4)), (max(w // 4, 3), max(h // 5, 3))]
    out = []
    for sw, sh in shapes:
        small = rng.integers(0, 256, (max(sh // 8, 2), max(sw // 8, 2), 3), dtype=np.uint8)
        out.append(Image.fromarray(small, "RGB").resize((sw, sh), Image.Resampling.BILINEAR))
    return out


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _onnx_export(
    module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, dynamic_length: bool = False
) -> None:
    # nn.MultiheadAttention's inference fast path is one fused op that ONNX has no symbol for.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _trace_export(module, example, path, input_name, dynamic_length)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _trace_export(
    module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str, dynamic_length: bool
) -> None:
    # Tracer warnings (Python ints and bools fixed at trace time) are checked for real by
    # verify_export, at a different batch size (and token length) than the trace's.
    axes = {0: "batch", 1: "length"} if dynamic_length else {0: "batch"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=["embedding"],
            dynamic_axes={input_name: axes, "embedding": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter: no onnxscript dependency, handles HF towers
        )


def _export_text(tower: torch.nn.Module, tokens: torch.Tensor, path: Path, pad_id: int) -> bool:
    """Export the text tower for any token length when its graph allows it, else for the context
    length only (a tower that adds its whole positional table, as open_clip's own text transformer
    does, fixes the length at trace time). Returns whether the export takes any length."""
    import onnxruntime as ort

    from retriever.onnx.runtime import drop_padding_columns

    _onnx_export(tower, tokens, path, "tokens", dynamic_length=True)
    full = tokens.numpy()
    short = drop_padding_columns(full, pad_id)
    if short.shape[1] < full.shape[1]:
        try:
            sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            a, b = (sess.run(None, {sess.get_inputs()[0].name: t})[0] for t in (full, short))
            if np.abs(a - b).max() <= TOLERANCE:
                return True
        except Exception:  # ORT's own exception types: the traced graph cannot take another length
            pass
    _onnx_export(tower, tokens, path, "tokens")
    return False


def _file_entry(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not an earlier export: atomic_dir swaps the whole folder."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / EXPORT_JSON).exists())):
        raise UserError(f"{out_dir} exists and is not an ONNX export folder; give an empty or new folder.")


def export_onnx(
    encoder: LoadedModel, out_dir: str | Path, *, tolerance: float = TOLERANCE, texts: list[str] | None = None
) -> dict[str, Any]:
    """Export, verify and atomically write `encoder`'s towers to `out_dir`; returns export.json's dict.

    Parameters: `encoder` a LoadedModel (any device; exported from an fp32 CPU copy), `out_dir` the
    folder to create or replace (only an earlier export is replaced), `tolerance` the largest max
    abs difference from torch accepted, `texts` extra sample strings for the verification.
    Raises ExportError (nothing written) when the model cannot be exported or disagrees.
    """
    import onnxruntime

    from retriever.onnx.runtime import OnnxEncoder

    out = Path(out_dir).expanduser()
    check_out_dir(out)
    model = encoder.model
    if encoder.device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    cpu_encoder = LoadedModel(
        model,
        encoder.preprocess,
        encoder.preprocess_train,
        encoder.tokenizer,
        encoder.identity,
        torch.device("cpu"),
        "fp32",
        encoder.config,
    )
    model.eval()
    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared index's export from other users
        tok_spec = tokenizer_spec(cpu_encoder, tmp)
        pp_spec = preprocess_spec(cpu_encoder)
        tokens = cpu_encoder.tokenizer(SAMPLE_TEXTS[:2])
        dynamic = _export_text(_TextTower(model), tokens, tmp / TEXT_FILE, tok_spec.get("pad_id", 0))
        pixels = torch.zeros(2, 3, *pp_spec["size"])
        _onnx_export(_ImageTower(model), pixels, tmp / IMAGE_FILE, "pixels")
        info = {
            "format": FORMAT_VERSION,
            "identity": encoder.identity.to_dict(),
            "text": {**_file_entry(tmp / TEXT_FILE), "tokenizer": tok_spec, "dynamic_length": dynamic},
            "image": {**_file_entry(tmp / IMAGE_FILE), "preprocess": pp_spec},
            "opset": OPSET,
            "exported_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        }
        (tmp / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
        info["verified"] = verify_export(cpu_encoder, OnnxEncoder(tmp, encoder.identity), tolerance, texts)
        (tmp / EXPORT_JSON).write_text(json.dumps(info, indent=2) + "\n")
    return info


def verify_export(
    encoder: LoadedModel, ort_encoder, tolerance: float = TOLERANCE, texts: list[str] | None = None
) -> dict[str, float]:
    """Compare the runtime with torch on sample inputs; ExportError when they disagree."""
    from retriever.models.encode import encode_image_tensors, encode_texts

    strings = SAMPLE_TEXTS + list(texts or [])
    torch_tokens = encoder.tokenizer(strings).numpy()
    ort_tokens = ort_encoder.tokenizer(strings)
    if not np.array_equal(torch_tokens, ort_tokens):
        bad = [s for s, a, b in zip(strings, torch_tokens, ort_tokens) if not np.array_equal(a, b)]
        raise ExportError(f"The torch-free tokenizer disagrees with open_clip's on {bad[0]!r}; export refused.")
    reference = encode_texts(encoder, strings)
    # One batch is as long as its longest text; one text at a time exercises the runtime's trimming.
    one_by_one = np.concatenate([ort_encoder.encode_texts([s]) for s in strings])
    text_diff = float(
        max(np.abs(reference - ort_encoder.encode_texts(strings)).max(), np.abs(reference - one_by_one).max())
    )

    images = sample_images(ort_encoder.image_info["preprocess"]["size"])
    torch_pixels = torch.stack([encoder.preprocess(im) for im in images])
    ort_pixels = np.stack([ort_encoder.preprocess(im) for im in images])
    pixel_diff = float(np.abs(torch_pixels.numpy() - ort_pixels).max())
    image_diff = float(
        np.abs(encode_image_tensors(encoder, torch_pixels) - ort_encoder.encode_pixels(ort_pixels)).max()
    )
    for what, diff in (
        ("text embeddings", text_diff),
        ("preprocessed pixels", pixel_diff),
        ("image embeddings", image_diff),
    ):
        if not diff <= tolerance:
            raise ExportError(
                f"The ONNX export's {what} differ from torch by {diff:.2e} (> {tolerance:.0e}); export refused."
            )
    return {
        "text_max_abs_diff": text_diff,
        "pixel_max_abs_diff": pixel_diff,
        "image_max_abs_diff": image_diff,
        "texts": len(strings),
        "images": len(images),
    }


def export_for_index(index_dir: str | Path, encoder: LoadedModel | None = None) -> tuple[Path, bool]:
    """Make sure INDEX/onnx holds a verified export of the index's model; returns (folder, written).

    An export already there that matches the index's model (identity and file sizes) is kept.
    Otherwise the model is loaded from the manifest's identity (or `encoder` is used, after checking
    it is the index's model) and exported. Raises UserError when the model cannot be loaded or
    exported; the index itself is never touched.
    """
    from retriever.identity import ModelIdentity
    from retriever.indexes.manifest import read_index_manifest
    from retriever.models.load import load_model
    from retriever.onnx.choose import EXPORT_SUBDIR
    from retriever.onnx.runtime import ExportUnusable, OnnxEncoder

    index_dir = Path(index_dir)
    identity = ModelIdentity.from_dict(read_index_manifest(index_dir).model)
    folder = index_dir / EXPORT_SUBDIR
    try:
        OnnxEncoder(folder, identity)
        return folder, False
    except ExportUnusable:
        pass
    if encoder is None:
        try:
            encoder = load_model(identity.name, identity.pretrained, device="cpu")
        except UserError as e:
            raise UserError(f"could not load the index's model {identity.label()} to export it ({e})") from None
    encoder.identity.check_same(identity, f"Index {index_dir}")
    export_onnx(encoder, folder)
    return folder, True
