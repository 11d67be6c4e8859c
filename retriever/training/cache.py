"""`--cache-features`: with both towers locked, run them once and train only heads and temperature.

A locked tower in eval mode is a fixed function, so its outputs can be computed once per image and
once per caption and reused every epoch (the LiT recipe on a CPU budget). With the image trunk's
last blocks unlocked (`--unlock-image-last N`), the locked part below them is still a fixed
function: its output maps are cached instead, and the unlocked blocks train on them. What trains is what sits
after the towers: the image projection (`visual.head` of a timm tower), the text projection
(`text.proj` of an HF tower) and the loss parameters. This needs towers that keep trunk and head
apart, i.e. a model composed with `--image-tower timm:...` and `--text-tower hf:...`; open_clip's
native ViT/text transformer fold their projection into the locked tower.

Images are seen through the eval transform, plus, with `views > 1`, through `views - 1` seeded
geometric views each (zoom, shift, a small rotation, white fill: no flips, which turn arrows
around, and no colour jitter, which turns a red heart pink); each epoch draws one cached view per
image, so augmentation costs tower passes once, not every epoch. Each caption is cached, so each
epoch still draws one caption per image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from retriever.atomic import atomic_path, write_bytes_atomic
from retriever.data.loading import ImageDataset, collate_decoded
from retriever.data.sources import SourceItem
from retriever.errors import UserError
from retriever.models.encode import drop_padding_columns
from retriever.models.load import LoadedModel, state_dict_sha256
from retriever.skipped import skipped_entry

log = logging.getLogger(__name__)


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
    """Trunk/head of a composed (timm image, HF text) open_clip model whose trunks are locked.

    An image trunk whose last blocks are unlocked (`--unlock-image-last N`) is split below them:
    the cache then holds the feature maps entering the first unlocked block, and what trains on
    them is those blocks, the trunk's pooling and the projection (see `image_trunk_split`).
    """
    visual: Any = getattr(model, "visual", None)
    text: Any = getattr(model, "text", None)
    if not (
        hasattr(visual, "trunk") and hasattr(visual, "head") and hasattr(text, "transformer") and hasattr(text, "proj")
    ):
        raise UserError(
            "--cache-features needs a model composed from towers (--image-tower timm:NAME --text-tower hf:PATH); "
            "this model's projections are part of its locked towers, so nothing would train."
        )
    if any(p.requires_grad for p in text.transformer.parameters()):
        raise UserError("--cache-features needs a fully locked text tower: use --lock-text without unlocking layers.")

    def text_trunk(ids: torch.Tensor) -> torch.Tensor:
        # HFTextEncoder.forward minus its projection. Trailing columns that are padding in every
        # row are dropped first: masked keys get zero attention weight and the mean pooler skips
        # them, so the result is the same while short captions cost a fraction of the 32 tokens.
        ids = drop_padding_columns(ids, text.config.pad_token_id)
        attn = (ids != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=ids, attention_mask=attn), attn)

    if not any(p.requires_grad for p in visual.trunk.parameters()):
        return TowerSplit(visual.trunk, visual.head, text_trunk, text.proj, (visual.trunk, text.transformer))
    below, above = image_trunk_split(visual.trunk)
    return TowerSplit(below, torch.nn.Sequential(above, visual.head), text_trunk, text.proj, (below, text.transformer))


class _TrunkBelow(torch.nn.Sequential):
    """The locked first part of a trunk; its output maps are cached in fp16 (half the bytes, and
    the unlocked blocks see them again in fp32: rounding far below what training moves)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).half()


class _TrunkAbove(torch.nn.Module):
    """The unlocked last blocks of a trunk, then its own pooling: maps in, the trunk's features out."""

    def __init__(self, blocks: list[torch.nn.Module], trunk: Any):
        super().__init__()
        self.blocks = torch.nn.Sequential(*blocks)
        self.pool = trunk.forward_head  # global pool (+ flatten); the classifier was reset to Identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = next(self.blocks.parameters())
        return self.pool(self.blocks(x.to(w.dtype)))


def image_trunk_split(trunk: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(locked part, unlocked part) of a partly unlocked timm EfficientNet-family trunk.

    These trunks are one chain: stem, the blocks of every stage, head conv + norm, pooling; open_clip
    unlocks whole blocks from the end (`lock_image_tower(unlocked_groups=N)`), so the chain splits
    at the first module with a trainable parameter, and below it everything is a fixed function.
    """
    if not all(hasattr(trunk, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head")):
        raise UserError(
            "--cache-features with --unlock-image-last works for EfficientNet-family image towers (a chain of "
            f"blocks); {type(trunk).__name__} is not one. Drop --cache-features to train it end to end."
        )
    chain = [trunk.conv_stem, trunk.bn1, *[b for stage in trunk.blocks for b in stage], trunk.conv_head, trunk.bn2]
    trainable = [any(p.requires_grad for p in m.parameters()) for m in chain]
    first = trainable.index(True)
    if not all(trainable[first:]) or any(p.requires_grad for m in chain[:first] for p in m.parameters()):
        raise UserError("--cache-features needs the unlocked image blocks to be the last ones of the trunk.")
    return _TrunkBelow(*chain[:first]).eval(), _TrunkAbove(chain[first:], trunk)


@dataclass
class CachedSplit:
    """Tower outputs for one split: image rows for the decodable items, and every caption."""

    items: list[SourceItem]  # the decodable items, in order; row i of `image`
    image: torch.Tensor  # (len(items), D_img)
    text: torch.Tensor  # (total captions, D_txt)
    caption_start: torch.Tensor  # (len(items),) first caption row of each item
    skipped: list[dict]  # skipped_entry(path, reason) per undecodable item
    views: torch.Tensor | None = None  # (len(items), V - 1, D_img) augmented views, if any
    reused: int = 0  # images whose rows came from another cache file (the towers ran on the rest)

    def image_rows(self, items: Sequence[int], draws: Sequence[int]) -> torch.Tensor:
        """One row per item: the eval view or an augmented one, chosen by `draw % V` (a seeded draw)."""
        if self.views is None:
            return self.image[list(items)]
        n_views = self.views.shape[1] + 1
        rows = []
        for item, draw in zip(items, draws):
            v = draw % n_views
            rows.append(self.image[item] if v == 0 else self.views[item, v - 1])
        return torch.stack(rows)

    def text_row(self, item: int, caption: int) -> int:
        return int(self.caption_start[item]) + caption

    def text_image(self) -> list[int]:
        return [i for i, it in enumerate(self.items) for _ in it.captions]


def geometric_view(img, seed: int):
    """A seeded view of a PIL image: zoom 0.75–1.15, shift ±10 %, rotate ±8°, white fill.

    Geometric only: crops/zooms and shifts are what a LiT-style recipe keeps from image
    augmentation; flips and colour changes would alter what many captions say.
    """
    import torchvision.transforms.v2 as T

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T.RandomAffine(degrees=8, translate=(0.1, 0.1), scale=(0.75, 1.15), fill=255)(img)


class _ViewTransform:
    """Preprocess of view `view` of an image whose per-image seed is `seed` (picklable, for
    DataLoader workers)."""

    def __init__(self, preprocess: Callable, view: int):
        self.preprocess, self.view = preprocess, view

    def __call__(self, img, seed: int):
        return self.preprocess(geometric_view(img, 1_000_003 * self.view + seed))


class _ViewDataset(ImageDataset):
    def __init__(self, paths: Sequence[str], transform: _ViewTransform):
        super().__init__(paths, transform.preprocess)
        self.transform = transform

    def __getitem__(self, i: int):
        from retriever.data.images import load_image

        try:
            return i, self.transform(load_image(self.paths[i]), view_seed(self.paths[i])), None
        except Exception as e:  # as ImageDataset: a bad file is data
            return i, None, f"{type(e).__name__}: {e}"


def view_seed(location: str) -> int:
    """The seed of an image's augmented views: a function of its location, not of its position in
    a split, so the same image has the same views in every run and a cached view can be reused."""
    return zlib.crc32(location.encode())


Ident = tuple[str, int, int]


def item_identity(location: str) -> Ident | None:
    """(location, size, mtime_ns) of the file holding an image (its tar or Parquet file for a member);
    None when it cannot be read. Cached rows are reused only for an unchanged file."""
    from retriever.data.locations import split_location

    parts = split_location(location)
    try:
        st = os.stat(parts[1] if parts else location)
    except OSError:
        return None
    return location, st.st_size, st.st_mtime_ns


def model_key(encoder: LoadedModel, split: TowerSplit) -> str:
    """What the cached outputs are a function of besides the images: the locked trunks' weights,
    the config that shapes their outputs (pooling, caption length, tokenizer; not the heads) and
    the eval preprocessing."""
    h = hashlib.sha256()
    for trunk in split.trunks:
        h.update(state_dict_sha256(trunk).encode())
    cfg = encoder.config.get("model_cfg") or {}
    shaping = {
        "vision": {k: v for k, v in (cfg.get("vision_cfg") or {}).items() if k in _TRUNK_VISION_KEYS},
        "text": {k: v for k, v in (cfg.get("text_cfg") or {}).items() if k in _TRUNK_TEXT_KEYS},
    }
    h.update(repr(shaping).encode())
    h.update(repr(encoder.config.get("preprocess_cfg")).encode())
    return h.hexdigest()[:20]


_TRUNK_VISION_KEYS = ("timm_model_name", "timm_pool", "image_size")
_TRUNK_TEXT_KEYS = ("hf_pooler_type", "hf_tokenizer_name", "context_length")


def cache_key(model: str, items: Sequence[SourceItem], idents: Sequence[Ident | None], views: int = 1) -> str:
    """The name of a split's cache file: the model key, the views and every item (its
    `item_identity`, or its location when unreadable) with its captions."""
    h = hashlib.sha256(model.encode())
    if views > 1:
        h.update(f"views={views}".encode())
    for it, ident in zip(items, idents):
        h.update(repr(ident or it.path).encode())
        h.update("\x1f".join(it.captions).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:20]


@dataclass
class _Reused:
    """Rows found in other cache files of the same model: by item position, and by caption text."""

    image: dict[int, torch.Tensor]
    views: dict[int, torch.Tensor]
    text: dict[str, torch.Tensor]


def reusable_rows(
    cache_dir: Path, model: str, items: Sequence[SourceItem], idents: Sequence[Ident | None], views: int
) -> _Reused:
    """Tower outputs of `items` and their captions already computed into any cache file in
    `cache_dir` by the same model (`model_key`): a refit on training + validation, or a run on a
    grown collection, then computes only what is new. An item is reused when its file is unchanged
    (`item_identity`) and the file holds at least `views` views of it; an unreadable cache file
    is passed over."""
    from safetensors import safe_open

    wanted = {ident: i for i, ident in enumerate(idents) if ident is not None}
    captions = {c for it in items for c in it.captions}
    found = _Reused({}, {}, {})
    for path in sorted(Path(cache_dir).glob("*.safetensors")):
        if len(found.image) == len(wanted) and len(found.text) == len(captions):
            break
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("model") != model:
                    continue
                listed = json.loads(_listing(path).read_text())
                hits = []
                if int(meta["views"]) >= views:  # captions are reusable whatever the views
                    theirs = (tuple(x) for x in listed["items"])  # the file's rows' item identities
                    hits = [(row, wanted[x]) for row, x in enumerate(theirs) if x in wanted]
                    hits = [(row, i) for row, i in hits if i not in found.image]
                if hits:
                    image = f.get_tensor("image")
                    aug = f.get_tensor("views")[:, : views - 1] if views > 1 else None
                    for row, i in hits:
                        found.image[i] = image[row]
                        if aug is not None:
                            found.views[i] = aug[row]
                caps = listed["captions"]
                if any(c in captions and c not in found.text for cs in caps for c in cs):
                    text, start = f.get_tensor("text"), f.get_tensor("caption_start")
                    for row, cs in enumerate(caps):
                        for j, c in enumerate(cs):
                            if c in captions:
                                found.text.setdefault(c, text[int(start[row]) + j])
        except Exception as e:  # a torn or foreign file is only a cache miss
            log.debug("Not reusing %s: %s", path, e)
    return found


def _listing(path: Path) -> Path:
    """The JSON beside a cache file naming its rows' items and captions (in a file of its own: a
    safetensors header is capped at 100 MB, a million items' listing is more)."""
    return path.with_name(path.name.removesuffix(".safetensors") + ".items.json")


@torch.no_grad()
def compute_tower_features(
    encoder: LoadedModel,
    split: TowerSplit,
    items: Sequence[SourceItem],
    *,
    cache_dir: Path | None = None,
    name: str = "train",
    views: int = 1,
    batch_size: int = 32,
    text_batch_size: int = 128,
    workers: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> CachedSplit:
    """Run the locked trunks over `items` once; reuse `cache_dir/{name}-{key}.safetensors` if present.

    Otherwise rows that other cache files in `cache_dir` hold for the same model are reused
    (`reusable_rows`) and the trunks run over the rest only. `views > 1` also runs them over
    `views - 1` seeded geometric views of each image (see `geometric_view`); an image any of whose
    views fails to decode is skipped.
    """
    from safetensors.torch import load_file, save_file

    path, model, idents = None, "", []
    reused = _Reused({}, {}, {})
    if cache_dir is not None:
        model = model_key(encoder, split)  # hashes the trunks' weights: only for a cache
        idents = [item_identity(it.path) for it in items]  # one stat per image, used three times
        path = Path(cache_dir) / f"{name}-{cache_key(model, items, idents, views)}.safetensors"
        t = None
        if path.is_file():
            try:
                t = load_file(str(path))
            except Exception as e:  # unreadable (disk damage, another version): computed again below
                log.warning("Recomputing tower features: the cache file %s cannot be read (%s)", path, e)
        if t is not None:
            cached = [items[int(i)] for i in t["kept"]]
            kept_set = {int(i) for i in t["kept"]}
            not_cached = [
                skipped_entry(it.path, "could not be decoded when its features were cached")
                for i, it in enumerate(items)
                if i not in kept_set
            ]
            return CachedSplit(
                cached, t["image"], t["text"], t["caption_start"], not_cached, t.get("views"), len(cached)
            )
        if Path(cache_dir).is_dir():
            reused = reusable_rows(Path(cache_dir), model, items, idents, views)

    for trunk in split.trunks:
        trunk.eval()
    todo = [i for i in range(len(items)) if i not in reused.image]
    paths = [items[i].path for i in todo]
    new_captions = sorted({c for it in items for c in it.captions if c not in reused.text})
    total = views * len(todo) + len(new_captions)
    done = 0
    skipped: dict[int, dict] = {}
    per_view: list[dict[int, torch.Tensor]] = []
    for v in range(views):
        dataset = (
            ImageDataset(paths, encoder.preprocess)
            if v == 0
            else _ViewDataset(paths, _ViewTransform(encoder.preprocess, v))
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_decoded
        )
        rows: dict[int, torch.Tensor] = {}
        for batch in loader:
            done += len(batch.indices) + len(batch.errors)
            for j, reason in batch.errors:
                skipped.setdefault(todo[j], skipped_entry(paths[j], reason))
            if batch.pixels is not None:
                # channels_last: conv trunks run much faster so on CPU, and on GPU tensor cores.
                px = batch.pixels.to(encoder.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                with encoder.autocast():
                    feats = split.image_trunk(px)
                # Pooled features in fp32; feature maps below unlocked blocks stay fp16 (_TrunkBelow).
                feats = feats.cpu() if feats.dtype == torch.float16 else feats.float().cpu()
                rows.update(zip((todo[j] for j in batch.indices), feats))
            if progress:
                progress(done, total)
        per_view.append(rows)
    computed = set.intersection(*(set(r) for r in per_view))
    kept = sorted(computed | set(reused.image))
    if not kept:
        raise UserError(f"None of the {name} images could be decoded.")
    image = torch.stack([per_view[0][i] if i in computed else reused.image[i] for i in kept])
    aug = None
    if views > 1:
        aug = torch.stack(
            [torch.stack([r[i] for r in per_view[1:]]) if i in computed else reused.views[i] for i in kept]
        )
    if new_captions:
        reused.text.update(zip(new_captions, text_features(encoder, split, new_captions, batch_size=text_batch_size)))
        done += len(new_captions)
        if progress:
            progress(done, total)
    texts = [c for i in kept for c in items[i].captions]
    starts, n = [], 0
    for i in kept:
        starts.append(n)
        n += len(items[i].captions)
    out = CachedSplit(
        [items[i] for i in kept],
        image,
        torch.stack([reused.text[c] for c in texts]) if texts else torch.empty(0, 0),
        torch.tensor(starts),
        [skipped[i] for i in sorted(skipped) if i not in set(kept)],
        aug,
        len(reused.image),
    )
    if path is not None:
        tensors = {"image": out.image, "text": out.text, "caption_start": out.caption_start, "kept": torch.tensor(kept)}
        if aug is not None:
            tensors["views"] = aug.contiguous()
        listing = {
            "items": [idents[i] or [items[i].path, -1, -1] for i in kept],
            "captions": [list(items[i].captions) for i in kept],
        }
        # First: a listing whose tensors are missing is never read.
        write_bytes_atomic(_listing(path), json.dumps(listing, separators=(",", ":")).encode())
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"model": model, "views": str(views)})
    return out


@torch.no_grad()
def text_features(encoder: LoadedModel, split: TowerSplit, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """Text-trunk outputs of `texts`, in order; batched by token length so little padding is computed."""
    ids = encoder.tokenizer(list(texts))
    pad = getattr(getattr(encoder.model, "text", None), "config", None)
    lengths = (ids != (pad.pad_token_id if pad is not None else 0)).sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty(0)
    for s in range(0, len(texts), batch_size):
        rows = order[s : s + batch_size]
        with encoder.autocast():
            feats = split.text_trunk(ids[rows].to(encoder.device)).float().cpu()
        if out.numel() == 0:
            out = torch.empty(len(texts), feats.shape[1])
        out[rows] = feats
    return out


def cached_eval_embeddings(
    split: TowerSplit, cached: CachedSplit, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised embeddings of a cached split through the current heads."""
    with torch.no_grad():  # in chunks: cached feature maps through unlocked blocks take memory
        img = torch.cat([split.encode_image(x.to(device)).float().cpu() for x in cached.image.split(256)])
        txt = split.encode_text(cached.text.to(device)).float().cpu()
    return img, txt
