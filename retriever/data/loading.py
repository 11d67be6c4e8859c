"""Where image–caption pairs come from: a folder of images, or a manifest file.

A source is a list of `SourceItem`s in a deterministic order. The position in that order becomes
the row's `id`, which is what makes ids stable when an interrupted `embed` resumes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from retriever.data.images import DEFAULT_MAX_PIXELS, load_image


def default_workers() -> int:
    """Image-decoding worker processes that help rather than hurt.

    On a CPU-only machine every worker competes with torch's intra-op threads for the same cores:
    on 2 cores, embedding with 2 workers ran slower than with none (benchmarks/RESULTS.md, "Decode
    workers compete on 2 cores"). So leave two cores to torch there; with a GPU, decoding is all
    the CPU has to do.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if torch.cuda.is_available():
        return min(8, cpus)
    return max(0, min(4, cpus - 2))


@dataclass
class DecodedBatch:
    indices: list[int]  # positions (into the dataset's items) that decoded
    pixels: torch.Tensor | None  # (len(indices), 3, H, W)
    errors: list[tuple[int, str]]  # (position, reason) for those that did not

    def pin_memory(self, device: str | torch.device | None = None) -> DecodedBatch:
        """Page-locked pixels, so `.to(cuda, non_blocking=True)` really overlaps the copy.

        torch's DataLoader (pin_memory=True) calls this on custom batch types; without it a
        dataclass batch was passed through unpinned and every copy was synchronous.
        """
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory() if device is None else self.pixels.pin_memory(device)
        return self


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers, turning failures into records."""

    def __init__(
        self,
        paths: Sequence[str],
        preprocess: Callable[[Image.Image], torch.Tensor],
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ):
        self.paths = list(paths)
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            return i, self.preprocess(load_image(self.paths[i], self.max_pixels)), None
        except Exception as e:  # any decoder failure is data, not a crash (bombs, truncation, junk)
            return i, None, f"{type(e).__name__}: {e}"


def collate_decoded(samples) -> DecodedBatch:
    good = [(i, t) for i, t, err in samples if err is None]
    errors = [(i, err) for i, _, err in samples if err is not None]
    pixels = torch.stack([t for _, t in good]) if good else None
    return DecodedBatch([i for i, _ in good], pixels, errors)
