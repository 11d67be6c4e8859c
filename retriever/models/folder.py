"""Training checkpoints: an open_clip `local-dir:` folder plus, for `--resume`, a training state.

A folder holds `open_clip_config.json` and `open_clip_model.safetensors`, so both
`retriever.models.load.load_model("local-dir:F")` and plain
`open_clip.create_model_and_transforms("local-dir:F")` load it. Models with a Hugging Face text
tower also get their tokenizer files, because open_clip's `get_tokenizer("local-dir:F")` reads the
tokenizer from F itself. `train_state.pt` holds only tensors and plain containers (optimizer state,
RNG states as tensors, counters), so it loads with `torch.load(weights_only=True)`: no pickled code
from a run directory is ever executed. Folders are replaced atomically (`fsutil.atomic_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"


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
    tok = config.get("model_cfg", {}).get("text_cfg", {}).get("hf_tokenizer_name")
    if tok:
        from transformers import AutoTokenizer

        from retriever.models.compose import _hf_offline

        with _hf_offline():
            AutoTokenizer.from_pretrained(tok).save_pretrained(folder)
