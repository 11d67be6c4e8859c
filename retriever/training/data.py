"""What a training step sees: seeded splits, one caption per image per epoch, rank-sliced batches.

Everything random about the data is a pure function of (seed, epoch, position): the shuffle, the
caption drawn for each image, and the augmentation of each sample (its own seeded generator,
independent of DataLoader workers). That is what makes `--resume` exact and lets N processes
under torchrun see, together, exactly the batches one process would see: global batch b holds
samples [b·B, (b+1)·B) of the epoch's order, and rank r takes its r-th slice.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from retriever.data.images import load_image
from retriever.data.sources import SourceItem
from retriever.errors import UserError


def split_items(items: Sequence[SourceItem], fractions: Sequence[float], seed: int) -> list[list[SourceItem]]:
    """Split by image (never by caption, so held-out images are unseen), seeded; [rest, *held_out]."""
    if any(f < 0 for f in fractions) or sum(fractions) >= 1:
        raise UserError("Split fractions must be ≥ 0 and leave some data for training (their sum below 1).")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for f in fractions:
        n = int(round(len(items) * f))
        if f > 0 and n == 0:
            n = 1
        parts.append(sorted(order[start : start + n]))
        start += n
    rest = sorted(order[start:])
    return [[items[i] for i in idx] for idx in (rest, *parts)]


def with_captions(items: Sequence[SourceItem], what: str) -> list[SourceItem]:
    kept = [it for it in items if it.captions]
    if not kept:
        raise UserError(f"The {what} data has no captions; training and evaluation need image–caption pairs.")
    return kept


def with_templates(items: Sequence[SourceItem], templates: Sequence[str]) -> list[SourceItem]:
    """Each item's captions under each prompt template ("an icon of {}"), duplicates dropped.

    Caption augmentation with CLIP-style prompt templates (Radford et al. 2021): the heads learn
    that "a red heart", "an icon of a red heart" and "red heart" name one picture, which is how
    people phrase queries. The epoch's caption draw then picks among all variants.
    """
    if not templates:
        return list(items)
    return [
        replace(it, captions=tuple(dict.fromkeys(t.format(c) for c in it.captions for t in templates))) for it in items
    ]


@dataclass(frozen=True)
class Sample:
    item: int  # index into the split's item list
    caption: int  # which of the item's captions
    seed: int  # seeds this sample's augmentation


def epoch_samples(items: Sequence[SourceItem], epoch: int, seed: int) -> list[Sample]:
    """The epoch's order and caption choice: shuffled images, one caption drawn for each."""
    rng = random.Random(f"{seed}:{epoch}")
    order = list(range(len(items)))
    rng.shuffle(order)
    return [Sample(i, rng.randrange(len(items[i].captions)), rng.getrandbits(62)) for i in order]


def steps_per_epoch(n_items: int, batch_size: int) -> int:
    # Drop the last partial batch: InfoNCE's difficulty depends on batch size, and ranks must agree.
    return n_items // batch_size


def rank_batches(n_items: int, batch_size: int, rank: int, world: int, start_step: int = 0) -> list[list[int]]:
    """Positions (into `epoch_samples`) for this rank, one list per step from `start_step`."""
    per_rank = batch_size // world
    out = []
    for b in range(start_step, steps_per_epoch(n_items, batch_size)):
        s = b * batch_size + rank * per_rank
        out.append(list(range(s, s + per_rank)))
    return out


class PairDataset(torch.utils.data.Dataset):
    """(pixels, caption, error) for the samples of one epoch; an undecodable image gives
    (None, caption, (path, reason))."""

    def __init__(self, items: Sequence[SourceItem], samples: Sequence[Sample], transform: Callable, augment: bool):
        self.items, self.samples, self.transform, self.augment = items, samples, transform, augment

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, pos: int):
        smp = self.samples[pos]
        item = self.items[smp.item]
        caption = item.captions[smp.caption]
        try:
            img = load_image(item.path)
        except Exception as e:  # a bad file is data: dropped from its batch and reported
            return None, caption, (item.path, f"{type(e).__name__}: {e}")
        if self.augment:
            # The sample's own seed, so the crop does not depend on which worker runs it.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(smp.seed)
                return self.transform(img), caption, None
        return self.transform(img), caption, None


def make_collate(tokenizer: Callable):
    def collate(batch):
        good = [(px, cap) for px, cap, err in batch if err is None]
        errors = [err for _, _, err in batch if err is not None]
        if not good:
            return None, None, errors
        return torch.stack([px for px, _ in good]), tokenizer([cap for _, cap in good]), errors

    return collate


def epoch_loader(
    items: Sequence[SourceItem],
    epoch: int,
    *,
    seed: int,
    batch_size: int,
    rank: int,
    world: int,
    start_step: int,
    transform: Callable,
    augment: bool,
    tokenizer: Callable,
    workers: int,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    samples = epoch_samples(items, epoch, seed)
    return torch.utils.data.DataLoader(
        PairDataset(items, samples, transform, augment),
        batch_sampler=rank_batches(len(items), batch_size, rank, world, start_step),
        num_workers=workers,
        collate_fn=make_collate(tokenizer),
        persistent_workers=False,
        pin_memory=pin_memory,  # the (pixels, tokens, errors) tuple is pinned element by element
        # Its own generator: otherwise each new loader draws its workers' base seed from the global
        # RNG, shifting the dropout stream by one draw per loader, and a resumed run would differ.
        generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch),
    )
