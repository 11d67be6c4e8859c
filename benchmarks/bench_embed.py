"""Embed pipeline throughput against the bare model forward, same model, batch and precision.

    python benchmarks/bench_embed.py --json bench-out/embed.json
    python benchmarks/bench_embed.py --model RN50 --images 64 --repeat 15

Pipeline: `embed_items` over Twemoji PNGs (retriever.demo.emoji), i.e. file reading, PNG decoding
and preprocessing (in DataLoader workers when --workers > 0), the forward, normalisation and Parquet shard writing.
Bare: the model's `encode_image` on tensors decoded and preprocessed beforehand, in the same
memory format the pipeline uses (channels_last on the CPU). Items carry no captions so both sides
do image work only.

Runs alternate (pipeline, bare, pipeline, bare, …). This VM's speed drifts by ±5–10 % from one
run to the next, as much as the effect measured, so the table gives two estimates: the ratio of
the best run of each side, and the median of the ratios of adjacent (pipeline, bare) pairs, with
the spread of those pair ratios. Short runs (64 images for RN50, ~5 s) and many pairs keep the
pairs tight: 5 pairs of 256 images ranged 0.84–1.08, 15 pairs of 64 images 0.95–0.98.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.data.images import load_image  # noqa: E402
from retriever.data.loading import default_workers  # noqa: E402
from retriever.data.sources import SourceItem
from retriever.demo.emoji import emoji_collection  # noqa: E402
from retriever.embed import EmbedConfig, embed_items  # noqa: E402
from retriever.models.load import load_model  # noqa: E402

TINY = str(Path(__file__).resolve().parents[1] / "tests" / "assets" / "tiny-clip.json")


def bare_forward(encoder, tensors: list[torch.Tensor], batch: int) -> float:
    """Seconds for the model forward alone over pre-decoded tensors."""
    batches = [torch.stack(tensors[i : i + batch]) for i in range(0, len(tensors), batch)]
    if encoder.device.type == "cpu":
        batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
    batches = [b.to(encoder.device) for b in batches]
    t0 = time.perf_counter()
    with torch.no_grad(), encoder.autocast():
        for b in batches:
            encoder.model.encode_image(b)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def pipeline(encoder, items: list[SourceItem], batch: int, workers: int) -> float:
    """Seconds for embed_items end to end (shards written to a temporary folder)."""
    out = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        t0 = time.perf_counter()
        embed_items(
            items, encoder, out / "shards", EmbedConfig(batch_size=batch, num_workers=workers, shard_size=len(items))
        )
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(out, ignore_errors=True)


def bench(
    model: str, pretrained: str | None, n_images: int, batch: int, workers: int, repeat: int, device: str | None
) -> dict:
    encoder = load_model(model, pretrained, device=device)
    emoji = emoji_collection()[:n_images]
    items = [SourceItem(i, e.path) for i, e in enumerate(emoji)]
    t0 = time.perf_counter()
    tensors = [encoder.preprocess(load_image(it.path)) for it in items]
    decode_s = time.perf_counter() - t0
    pipeline(encoder, items[: 2 * batch], batch, workers)  # warm-up: worker start, kernels, allocator
    bare_forward(encoder, tensors[: 2 * batch], batch)
    pipe_runs, bare_runs = [], []
    for _ in range(repeat):
        pipe_runs.append(pipeline(encoder, items, batch, workers))
        bare_runs.append(bare_forward(encoder, tensors, batch))
    pipe_s, bare_s = min(pipe_runs), min(bare_runs)
    pair_ratios = sorted(b / p for p, b in zip(pipe_runs, bare_runs))
    n = len(items)
    return {
        "model": model,
        "pretrained": pretrained,
        "image_size": tuple(tensors[0].shape[-2:]),
        "images": n,
        "batch": batch,
        "workers": workers,
        "precision": encoder.precision,
        "device": str(encoder.device),
        "pipeline_images_per_s": round(n / pipe_s, 1),
        "bare_images_per_s": round(n / bare_s, 1),
        "ratio": round(bare_s / pipe_s, 3),  # best against best
        "median_pair_ratio": round(statistics.median(pair_ratios), 3),
        "pair_ratio_range": (round(pair_ratios[0], 3), round(pair_ratios[-1], 3)),
        "repeat": repeat,
        "pipeline_runs_s": [round(x, 4) for x in pipe_runs],
        "bare_runs_s": [round(x, 4) for x in bare_runs],
        "decode_only_images_per_s_one_process": round(n / decode_s, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", help=f"model(s) to run (default: {TINY} and RN50 random)")
    p.add_argument("--pretrained", default=None, help="pretrained tag for hub models (default: random)")
    p.add_argument(
        "--images", type=int, default=None, help="images per run (default: all ~1.9k for the tiny model, 64 otherwise)"
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument(
        "--workers", type=int, default=None, help="decode workers (default: what `retriever embed` uses here)"
    )
    p.add_argument("--repeat", type=int, default=15, help="alternating (pipeline, bare) pairs")
    p.add_argument("--device", default=None)
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args()
    models = args.model or [TINY, "RN50"]
    workers = default_workers() if args.workers is None else args.workers
    rows = []
    t0 = time.time()
    for m in models:
        tiny = m.endswith(".json")
        pretrained = None if tiny else (args.pretrained or "random")
        n = args.images or (10_000 if tiny else 64)  # short runs, many pairs: drift hits both sides alike
        rows.append(bench(m, pretrained, n, args.batch, workers, args.repeat, args.device))
    head = f"{'model':<28} {'px':>7} {'imgs':>5} {'batch':>5} {'prec':>5} {'pipeline img/s':>15} {'bare img/s':>11} {'best':>6} {'median':>6} {'pair range':>11} {'decode img/s':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        name = Path(r["model"]).name if r["model"].endswith(".json") else f"{r['model']} ({r['pretrained']})"
        print(
            f"{name[:28]:<28} {'x'.join(map(str, r['image_size'])):>7} {r['images']:>5} {r['batch']:>5} {r['precision']:>5} "
            f"{r['pipeline_images_per_s']:>15.1f} {r['bare_images_per_s']:>11.1f} {r['ratio']:>6.3f} {r['median_pair_ratio']:>6.3f} "
            f"{'–'.join(f'{x:.2f}' for x in r['pair_ratio_range']):>11} {r['decode_only_images_per_s_one_process']:>12.1f}"
        )
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
            "cpus": os.cpu_count(),
            "argv": sys.argv,
            "loadavg_at_end": os.getloadavg(),
        }
        tmp = Path(args.json_path).with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
        os.replace(tmp, args.json_path)


if __name__ == "__main__":
    main()
