"""Training checkpoints: a model folder (`retriever.models.folder`) plus, for `--resume`, a training state.

`train_state.pt` holds only tensors and plain containers (optimizer state, RNG states as tensors,
counters), so it loads with `torch.load(weights_only=True)`: no pickled code from a run directory is
ever executed. Folders are replaced atomically (`retriever.atomic.atomic_dir`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from retriever.atomic import atomic_dir
from retriever.errors import UserError
from retriever.models.folder import write_model_files

STATE_FILE = "train_state.pt"


def save_checkpoint(
    folder: str | Path,
    model: torch.nn.Module,
    config: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    extra_json: dict[str, dict] | None = None,
) -> Path:
    """Atomically (re)write `folder` as a loadable model folder, with an optional training state."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        write_model_files(tmp, model, config)
        if state is not None:
            torch.save(state, tmp / STATE_FILE)
        for name, obj in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return folder


def load_train_state(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"Cannot resume: {path} does not exist (no checkpoint was saved in this run yet).")
    # weights_only=True: a run directory may come from anywhere; never unpickle code from it.
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """Torch's generator states as tensors (weights_only-loadable)."""
    out: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
