"""Training step time against a bare open_clip loop, and GradCache's peak memory.

1. Step time: `retriever.training.loop.train_step` (what `retriever train` runs per step) against the
   loop open_clip's own trainer boils down to (model forward → open_clip ClipLoss → backward →
   AdamW step), on the same model, batch and precision, interleaved in one process so machine
   load affects both alike. Goal: ratio ≤ 1.05. Gradient clipping is off in both by default
   (open_clip_train's default); `--grad-clip` adds it to ours only and is reported as such.
2. Peak memory: one step at batch B = 8·m with `--micro-batch m` (GradCache) against a plain
   step at B. On CUDA: torch.cuda.max_memory_allocated. On CPU (Linux): each measurement runs in
   a fresh process and reports how far its RSS rises above the level before the step (model and
   optimiser state already exist), sampled on a thread, since torch's CPU allocator has no peak
   counter.

    python benchmarks/bench_train.py                       # tiny config, CPU
    python benchmarks/bench_train.py --model ViT-B-32 --batch-size 64 --device cuda --precision bf16
    python benchmarks/bench_train.py --json bench_train.json
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TINY = str(ROOT / "tests" / "assets" / "tiny-clip.json")


def _setup(model_spec: str, device: str, precision: str, seed: int = 0):
    from retriever.models.load import load_model
    from retriever.training.optim import OptimConfig, autocast_for, build_optimizer, make_scaler

    encoder = load_model(
        model_spec, "random" if not model_spec.endswith(".json") else None, device=device, precision=precision
    )
    model = encoder.model.train()
    optimizer = build_optimizer(model, OptimConfig(lr=1e-5))
    return (
        encoder,
        model,
        optimizer,
        autocast_for(encoder.precision, encoder.device),
        make_scaler(encoder.precision, encoder.device),
    )


def _batch(encoder, n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = encoder.model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    images = torch.randn(n, 3, *size, generator=g).to(encoder.device)
    ctx = getattr(encoder.tokenizer, "context_length", 77)
    texts = torch.randint(1, 1000, (n, ctx), generator=g).to(encoder.device)
    return images, texts


def _ours(encoder, model, optimizer, autocast, scaler, micro_batch=None, grad_clip=None):
    from retriever.training.loop import train_step

    trainable = [p for p in model.parameters() if p.requires_grad]
    enc_i = lambda x: model.encode_image(x, normalize=True)  # noqa: E731
    enc_t = lambda t: model.encode_text(t, normalize=True)  # noqa: E731

    def step(images, texts):
        return train_step(
            model,
            optimizer,
            trainable,
            enc_i,
            enc_t,
            images,
            texts,
            micro_batch=micro_batch,
            autocast=autocast,
            scaler=scaler,
            grad_clip=grad_clip,
        )

    return step


def _bare(model, optimizer, autocast, scaler):
    """open_clip_train.train.train_one_epoch's inner step, without its logging and accumulation."""
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()

    def step(images, texts):
        optimizer.zero_grad()
        with autocast():
            img, txt, scale = model(images, texts)
            loss = loss_fn(img, txt, scale)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        return loss.item()

    return step


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(args) -> dict:
    encoder, model, opt, autocast, scaler = _setup(args.model, args.device, args.precision)
    images, texts = _batch(encoder, args.batch_size)
    variants = {
        "bare open_clip": _bare(model, opt, autocast, scaler),
        "retriever train_step": _ours(encoder, model, opt, autocast, scaler),
    }
    if args.batch_size >= 8:
        # GradCache's price: one extra forward of the whole batch (pass 1), for 1/k of the activations.
        m = args.batch_size // 4
        variants[f"retriever train_step, GradCache m={m}"] = _ours(encoder, model, opt, autocast, scaler, micro_batch=m)
    if args.grad_clip:
        variants[f"retriever train_step + clip {args.grad_clip}"] = _ours(
            encoder, model, opt, autocast, scaler, grad_clip=args.grad_clip
        )
    times = {k: [] for k in variants}
    for _ in range(args.warmup):
        for fn in variants.values():
            fn(images, texts)
    for _ in range(args.steps):  # interleaved: A B A B ..., so drift in machine load hits both
        for name, fn in variants.items():
            _sync(encoder.device)
            t0 = time.perf_counter()
            fn(images, texts)
            _sync(encoder.device)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["bare open_clip"]
    return {
        "model": args.model,
        "device": str(encoder.device),
        "precision": encoder.precision,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "rows": [
            {"variant": k, "median_step_s": v, "pairs_per_s": args.batch_size / v, "ratio_to_bare": v / base}
            for k, v in med.items()
        ],
        "ratio": med["retriever train_step"] / base,
    }


def _peak_child(model, device, precision, batch, micro, q):
    torch.set_num_threads(1)
    encoder, m, opt, autocast, scaler = _setup(model, device, precision)
    images, texts = _batch(encoder, batch)
    step = _ours(encoder, m, opt, autocast, scaler, micro_batch=micro)
    step(images[:2], texts[:2])  # creates gradients and AdamW state: not part of the difference
    m.zero_grad(set_to_none=False)
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
        step(images, texts)
        torch.cuda.synchronize()
        q.put((torch.cuda.max_memory_allocated() - before, "cuda max_memory_allocated"))
    else:
        with _RssSampler() as rss:
            step(images, texts)
        q.put((rss.peak - rss.start, "peak RSS growth, sampled every 0.5 ms"))


class _RssSampler:
    """Current RSS (from /proc/self/statm) sampled on a thread; ru_maxrss would instead report the
    process-lifetime peak, which model loading may already have set higher than the step."""

    def __enter__(self):
        import os
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def peak_memory(args) -> dict:
    B, m = 8 * args.micro_batch, args.micro_batch
    ctx = mp.get_context("spawn")
    out = {}
    for name, micro in (("plain", None), ("gradcache", m)):
        q = ctx.Queue()
        p = ctx.Process(target=_peak_child, args=(args.model, args.device, args.precision, B, micro, q))
        p.start()
        out[name], how = q.get(timeout=1800)
        p.join()
    return {
        "batch_size": B,
        "micro_batch": m,
        "measure": how,
        "plain_bytes": out["plain"],
        "gradcache_bytes": out["gradcache"],
        "ratio": out["gradcache"] / max(out["plain"], 1),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=TINY, help="open_clip name (random init) or config JSON")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=64, help="m for the memory test (B = 8·m)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default=None)
    ap.add_argument("--grad-clip", type=float, default=0.0)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    res = {"step_time": time_steps(args)}
    st = res["step_time"]
    print(
        f"\nStep time: {st['model']} on {st['device']} ({st['precision']}, batch {st['batch_size']}, "
        f"median of {st['steps']} interleaved steps, {st['threads']} threads)"
    )
    print(f"{'variant':<36}{'step (ms)':>12}{'pairs/s':>12}{'ratio':>8}")
    for r in st["rows"]:
        print(f"{r['variant']:<36}{r['median_step_s'] * 1e3:>12.1f}{r['pairs_per_s']:>12.0f}{r['ratio_to_bare']:>8.3f}")
    print(f"ratio retriever/bare = {st['ratio']:.3f} (goal ≤ 1.05)")

    if not args.skip_memory:
        mem = res["peak_memory"] = peak_memory(args)
        print(f"\nPeak memory of one step, B = {mem['batch_size']} ({mem['measure']})")
        print(f"{'variant':<36}{'MiB':>12}")
        print(f"{'plain step at B':<36}{mem['plain_bytes'] / 2**20:>12.1f}")
        print(f"{'GradCache, micro-batch ' + str(mem['micro_batch']):<36}{mem['gradcache_bytes'] / 2**20:>12.1f}")
        print(f"ratio gradcache/plain = {mem['ratio']:.3f}")
    if args.json:
        from retriever.atomic import write_json_atomic

        write_json_atomic(args.json, res)
    return res


if __name__ == "__main__":
    main()
