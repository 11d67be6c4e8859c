"""`--cache-features`: with both towers locked, run them once and train only heads and temperature.

A locked tower in eval mode is a fixed function, so its outputs can be computed once per image and
once per caption and reused every epoch (the LiT recipe on a CPU budget). What trains is what sits
after the towers: the image projection (`visual.head` of a timm tower), the text projection
(`text.proj` of an HF tower) and the loss parameters. This needs towers that keep trunk and head
apart, i.e. a model composed with `--image-tower timm:...` and `--text-tower hf:...`; open_clip's
native ViT/text transformer fold their projection into the locked tower.

Images are seen through the eval transform (a cached view cannot be re-augmented). Each caption
is cached, so each epoch still draws one caption per image.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from retriever.atomic import atomic_path
from retriever.data.loading import ImageDataset, collate_decoded
from retriever.data.sources import SourceItem
from retriever.errors import UserError
from retriever.models.load import LoadedModel, state_dict_sha256
from retriever.skipped import skipped_entry


@dataclass
class TowerSplit:
    image_trunk: Callable[[torch.Tensor], torch.Tensor]
    image_head: torch.nn.Module
    text_trunk: Callable[[torch.Tensor], torch.Tensor]
    text_head: torch.nn.Module
    trunks: tuple[torch.nn.Module, torch.nn.Module]

    def encode_image(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_head(feats), dim=-1)

    def encode_text(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_head(feats), dim=-1)


def split_towers(model: torch.nn.Module) -> TowerSplit:
    """Trunk/head of a composed (timm image, HF text) open_clip model whose trunks are locked."""
    visual: Any = getattr(model, "visual", None)
    text: Any = getattr(model, "text", None)
    if not (
        hasattr(visual, "trunk") and hasattr(visual, "head") and hasattr(text, "transformer") and hasattr(text, "proj")
    ):
        raise UserError(
            "--cache-features needs a model composed from towers (--image-tower timm:NAME --text-tower hf:PATH); "
            "this model's projections are part of its locked towers, so nothing would train."
        )
    if any(p.requires_grad for p in visual.trunk.parameters()) or any(
        p.requires_grad for p in text.transformer.parameters()
    ):
        raise UserError(
            "--cache-features needs both towers fully locked: use --lock-image --lock-text without unlocking layers."
        )

    def text_trunk(ids: torch.Tensor) -> torch.Tensor:
        # HFTextEncoder.forward minus its projection.
        attn = (ids != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=ids, attention_mask=attn), attn)

    return TowerSplit(visual.trunk, visual.head, text_trunk, text.proj, (visual.trunk, text.transformer))


@dataclass
class CachedSplit:
    """Tower outputs for one split: image rows for the decodable items, and every caption."""

    items: list[SourceItem]  # the decodable items, in order; row i of `image`
    image: torch.Tensor  # (len(items), D_img)
    text: torch.Tensor  # (total captions, D_txt)
    caption_start: torch.Tensor  # (len(items),) first caption row of each item
    skipped: list[dict]  # skipped_entry(path, reason) per undecodable item

    def text_row(self, item: int, caption: int) -> int:
        return int(self.caption_start[item]) + caption

    def text_image(self) -> list[int]:
        return [i for i, it in enumerate(self.items) for _ in it.captions]


def cache_key(encoder: LoadedModel, split: TowerSplit, items: Sequence[SourceItem]) -> str:
    h = hashlib.sha256()
    for trunk in split.trunks:
        h.update(state_dict_sha256(trunk).encode())
    h.update(repr(encoder.config.get("preprocess_cfg")).encode())
    for it in items:
        h.update(it.path.encode())
        h.update("\x1f".join(it.captions).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:20]


@torch.no_grad()
def compute_tower_features(
    encoder: LoadedModel,
    split: TowerSplit,
    items: Sequence[SourceItem],
    *,
    cache_dir: Path | None = None,
    name: str = "train",
    batch_size: int = 32,
    text_batch_size: int = 128,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> CachedSplit:
    """Run the locked trunks over `items` once; reuse `cache_dir/{name}-{key}.safetensors` if present."""
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{name}-{cache_key(encoder, split, items)}.safetensors"
        if path.is_file():
            t = load_file(str(path))
            cached = [items[int(i)] for i in t["kept"]]
            kept_set = {int(i) for i in t["kept"]}
            not_cached = [
                skipped_entry(it.path, "could not be decoded when its features were cached")
                for i, it in enumerate(items)
                if i not in kept_set
            ]
            return CachedSplit(cached, t["image"], t["text"], t["caption_start"], not_cached)

    for trunk in split.trunks:
        trunk.eval()
    loader = torch.utils.data.DataLoader(
        ImageDataset([it.path for it in items], encoder.preprocess),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate_decoded,
    )
    total = len(items) + sum(len(it.captions) for it in items)
    done = 0
    kept: list[int] = []
    img_feats: list[torch.Tensor] = []
    skipped: list[dict] = []
    for batch in loader:
        done += len(batch.indices) + len(batch.errors)
        skipped += [skipped_entry(items[i].path, reason) for i, reason in batch.errors]
        if batch.pixels is not None:
            # channels_last: conv trunks run much faster so on CPU, and on GPU tensor cores.
            px = batch.pixels.to(encoder.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with encoder.autocast():
                img_feats.append(split.image_trunk(px).float().cpu())
            kept += batch.indices
        if progress:
            progress(done, total)
    if not kept:
        raise UserError(f"None of the {name} images could be decoded.")
    texts = [c for i in kept for c in items[i].captions]
    starts, n = [], 0
    for i in kept:
        starts.append(n)
        n += len(items[i].captions)
    txt_feats = []
    for s in range(0, len(texts), text_batch_size):
        ids = encoder.tokenizer(texts[s : s + text_batch_size]).to(encoder.device)
        with encoder.autocast():
            txt_feats.append(split.text_trunk(ids).float().cpu())
        done += len(ids)
        if progress:
            progress(done, total)
    out = CachedSplit(
        [items[i] for i in kept],
        torch.cat(img_feats),
        torch.cat(txt_feats),
        torch.tensor(starts),
        skipped,
    )
    if path is not None:
        with atomic_path(path) as tmp:
            save_file(
                {"image": out.image, "text": out.text, "caption_start": out.caption_start, "kept": torch.tensor(kept)},
                str(tmp),
            )
    return out


def cached_eval_embeddings(
    split: TowerSplit, cached: CachedSplit, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings of a cached split through the current heads."""
    with torch.no_grad():
        img = split.encode_image(cached.image.to(device)).float().cpu()
        txt = split.encode_text(cached.text.to(device)).float().cpu()
    return img, txt
