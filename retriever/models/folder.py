"""The files of an open_clip `local-dir:` model folder, as retriever writes them.

A folder holds `open_clip_config.json` and `open_clip_model.safetensors`, so both
`retriever.models.load.load_model("local-dir:F")` and plain
`open_clip.create_model_and_transforms("local-dir:F")` load it. Models with a Hugging Face text
tower also get their tokenizer files, because open_clip's `get_tokenizer("local-dir:F")` reads the
tokenizer from F itself. Training checkpoints (`retriever.training.checkpoint`) are such a folder
plus a training state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# The weights' content hash, recorded when retriever writes the folder, so that loading it does not
# hash every parameter again; trusted only while the weights file keeps its recorded size and mtime.
WEIGHTS_RECORD = "retriever_weights.json"


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hash parameter and buffer contents (fp32, sorted by name), independent of storage format:
    the same values stored as fp16 or fp32, on any device, give the same hash."""
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def recorded_weights_sha256(folder: str | Path) -> str | None:
    """The weights hash recorded in `folder`, or None when there is none or the weights file has
    changed since it was recorded (another size or modification time): then hash the weights."""
    folder = Path(folder)
    try:
        record = json.loads((folder / WEIGHTS_RECORD).read_text())
        st = (folder / WEIGHTS_FILE).stat()
    except (OSError, ValueError):
        return None
    if record.get("file_bytes") != st.st_size or record.get("file_mtime_ns") != st.st_mtime_ns:
        return None
    h = record.get("weights_sha256")
    return h if isinstance(h, str) and len(h) == 64 else None


def public_config(config: dict[str, Any]) -> dict[str, Any]:
    """The open_clip config without retriever's private keys (`_registered_name` and the like)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def write_model_files(folder: Path, model: torch.nn.Module, config: dict[str, Any]) -> None:
    """Write config, weights and (HF text tower) tokenizer into an existing folder."""
    from safetensors.torch import save_file

    config = public_config(config)
    if not config.get("preprocess_cfg"):
        # A hub model's mean/std/interpolation come from its pretrained tag, not its model config;
        # without them here a reload would silently fall back to open_clip's defaults.
        import open_clip

        pp = open_clip.get_model_preprocess_cfg(model)
        if pp:
            config = {**config, "preprocess_cfg": {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    # contiguous(): channels_last or transposed views are refused by safetensors; clone() breaks
    # storage sharing between tensors, which safetensors refuses too.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    st = (folder / WEIGHTS_FILE).stat()
    record = {"weights_sha256": state_sha256(state), "file_bytes": st.st_size, "file_mtime_ns": st.st_mtime_ns}
    (folder / WEIGHTS_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    tok = config.get("model_cfg", {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if tok:
        from transformers import AutoTokenizer

        from retriever.models.compose import _hf_offline

        with _hf_offline():
            AutoTokenizer.from_pretrained(tok).save_pretrained(folder)
