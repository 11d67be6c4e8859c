"""`embed --backend`: run the forward passes on onnxruntime or torch, `auto` picking the faster one.

`auto` measures instead of guessing: on the CPU, with an fp32 model and an export at hand, it times
one batch of the job's size on each backend (after a warm-up) and keeps the faster. A GPU stays on
torch (this onnxruntime has no CUDA provider to compare with). Exports live in the model folder's
`onnx/` (local-dir models) or in a cache keyed by the weights' SHA-256, and are made (and verified)
when `--backend onnx` asks for one, or when `auto` has a job large enough to repay the export.
"""

from __future__ import annotations

import time

import numpy as np

from retriever.errors import UserError
from retriever.identity import ModelIdentity
from retriever.onnx.choose import BACKENDS, cache_dir, export_candidates

# Exporting the demo model takes ~15 s on 2 cores; below this many images auto does not bother.
AUTO_EXPORT_MIN_IMAGES = 2000


def find_export(identity: ModelIdentity, threads: int | None = None):
    """A usable OnnxEncoder of `identity` from the model folder or the cache, else None."""
    from retriever.onnx.runtime import ExportUnusable, OnnxEncoder

    for folder in export_candidates(None, identity):
        try:
            return OnnxEncoder(folder, identity, threads=threads).load()
        except ExportUnusable:
            continue
    return None


def time_batch(fn, pixels, repeats: int = 2) -> float:
    """Best of `repeats` timed calls after one warm-up (first calls allocate and tune)."""
    fn(pixels)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn(pixels)
        best = min(best, time.perf_counter() - t)
    return best


def choose_embed_backend(encoder, backend: str, batch_size: int, n_images: int):
    """(OnnxEncoder or None for torch, one line saying what was chosen and why, or None)."""
    import torch

    from retriever.models.encode import encode_image_tensors
    from retriever.onnx.export import export_onnx

    if backend not in BACKENDS:
        raise UserError(f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if backend == "torch":
        return None, None
    if encoder.device.type != "cpu" or encoder.precision != "fp32":
        if backend == "onnx":
            raise UserError("--backend onnx runs fp32 on the CPU; use --device cpu (or --backend torch on the GPU).")
        return None, None
    threads = torch.get_num_threads()  # same thread count on both sides: a fair comparison
    onnx = find_export(encoder.identity, threads)
    if onnx is None and (backend == "onnx" or n_images >= AUTO_EXPORT_MIN_IMAGES):
        from retriever.onnx.runtime import OnnxEncoder

        folder = cache_dir(encoder.identity)
        export_onnx(encoder, folder)
        onnx = OnnxEncoder(folder, encoder.identity, threads=threads).load()
    if backend == "onnx":
        return onnx, f"Embedding with onnxruntime ({onnx.describe()})."
    if onnx is None:
        return None, f"Embedding with torch (no ONNX export of this model, and {n_images} images do not repay one)."
    size = onnx.image_info["preprocess"]["size"]
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((batch_size, 3, *size), np.float32))
    t_torch = time_batch(lambda p: encode_image_tensors(encoder, p), pixels)
    t_onnx = time_batch(lambda p: onnx.encode_pixels(p.numpy()), pixels)
    faster = "onnxruntime" if t_onnx < t_torch else "torch"
    line = (
        f"Embedding with {faster}: one batch of {batch_size} took {t_onnx * 1e3:.0f} ms on onnxruntime, "
        f"{t_torch * 1e3:.0f} ms on torch."
    )
    return (onnx if t_onnx < t_torch else None), line
