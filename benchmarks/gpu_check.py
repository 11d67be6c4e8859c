"""The GPU checks, in one script: what runs on the machine at hand, what is skipped and why.

Meant for a machine with one GPU (≤ 10 minutes there); on a CPU-only machine it runs the CPU
parts and says which checks it skipped and why. Every import beyond torch and numpy is guarded:
a machine with torch + CUDA but no faiss or open_clip still gets the checks it can run.

    python benchmarks/gpu_check.py                     # everything this machine can run
    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --quick             # smaller sizes (a CPU smoke run)

Checks (issue 16):
  env          torch/CUDA/GPU, bf16 support, faiss version and GPU count, duplicate faiss installs
  defaults     on CUDA: device cuda, bf16 where supported else fp16, TF32 on once a model is loaded
  pinned       DataLoader(pin_memory=True) hands over page-locked DecodedBatch pixels
  embed:<m>    images/s at fp32, fp16, bf16 (tiny open_clip config; EfficientNet-Lite0-sized tower
               from timm or torchvision), and cosine agreement of fp16/bf16 vectors with fp32
  train_step   retriever's train_step on the tiny model: ms/step and a finite loss, per precision
  faiss        build on GPU vs CPU, search QPS GPU vs CPU, recall of GPU results against CPU
               results (Flat must agree exactly), k = 2048 served and k = 2049 refused, and an
               RFlat/OPQ index moved to the GPU and back and saved
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = str(ROOT / "tests" / "assets" / "tiny-clip.json")


class Skip(Exception):
    """A check that cannot run here; the message says why."""


ROWS: list[dict] = []


def run_check(name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    row = {"check": name, "status": "pass", "figures": {}, "note": ""}
    try:
        figures, note = fn(*args)
        row["figures"], row["note"] = figures or {}, note or ""
        if row["figures"].get("failed"):
            row["status"] = "fail"
    except Skip as e:
        row["status"], row["note"] = "skip", str(e)
    except Exception as e:  # a failing check is a result, not the end of the run
        row["status"], row["note"] = "fail", f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc(limit=6)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    ROWS.append(row)
    print(f"  {row['status']:4}  {name:<22} {row['seconds']:7.1f}s  {_short(row)}", flush=True)


def _short(row: dict) -> str:
    figs = ", ".join(f"{k}={v}" for k, v in row["figures"].items() if k != "failed")
    return "; ".join(x for x in (figs, row["note"]) if x)[:400]


def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _faiss():
    try:
        import faiss
    except ImportError as e:
        raise Skip(f"faiss is not installed here ({e})") from None
    return faiss


# ---------------------------------------------------------------- checks


def check_env():
    figs = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if _cuda() else None,
    }
    if _cuda():
        figs["capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
        figs["bf16"] = torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        import faiss

        from retriever.indexes.gpu import faiss_install_problem, gpu_count

        figs["faiss"] = faiss.__version__
        figs["faiss_gpus"] = gpu_count()
        problem = faiss_install_problem()
        if problem:
            figs["failed"] = True
            return figs, problem
    except ImportError as e:
        figs["faiss"] = f"missing ({e})"
    return figs, ""


def check_defaults():
    if not _cuda():
        raise Skip("torch sees no CUDA GPU: the CPU defaults (cpu, fp32) are covered by tests/models/test_gpu_torch.py")
    from retriever.models.load import load_model, resolve_device, resolve_precision

    dev = resolve_device(None)
    want = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    prec = resolve_precision(None, dev)
    load_model(TINY, device="cuda")
    tf32 = torch.backends.cuda.matmul.fp32_precision if hasattr(torch.backends.cuda.matmul, "fp32_precision") else None
    figs = {"device": str(dev), "precision": prec, "tf32": tf32}
    figs["failed"] = dev.type != "cuda" or prec != want or tf32 not in (None, "tf32")
    return figs, f"expected cuda, {want}, tf32"


def check_pinned():
    if not _cuda():
        raise Skip(
            "pinning needs a CUDA device; tests/models/test_gpu_torch.py checks the DecodedBatch hook on the CPU"
        )
    from retriever.data.loading import DecodedBatch, collate_decoded

    class Pixels(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return i, torch.rand(3, 64, 64), None

    loader = torch.utils.data.DataLoader(Pixels(), batch_size=4, collate_fn=collate_decoded, pin_memory=True)
    batch = next(iter(loader))
    ok = isinstance(batch, DecodedBatch) and batch.pixels.is_pinned()
    return {"pinned": ok, "failed": not ok}, ""


def _image_models(quick: bool):
    """(name, nn.Module taking (N,3,H,W), image size) for the towers this machine can build."""
    out = []
    try:
        from retriever.models.load import load_model

        enc = load_model(TINY, device="cuda" if _cuda() else "cpu")
        size = enc.model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        out.append(("tiny-clip", enc.model.visual, size))
    except Exception as e:
        out.append(("tiny-clip", e, 0))
    try:
        import timm

        out.append(("efficientnet_lite0", timm.create_model("efficientnet_lite0", pretrained=False), 224))
    except Exception as timm_error:
        try:
            import torchvision

            out.append(("efficientnet_b0(tv)", torchvision.models.efficientnet_b0(weights=None), 224))
        except Exception as tv_error:
            out.append(("efficientnet", ImportError(f"neither timm ({timm_error}) nor torchvision ({tv_error})"), 0))
    return out


def check_embed(name, model, size, quick: bool):
    if isinstance(model, Exception):
        raise Skip(f"cannot build {name}: {model}")
    dev = torch.device("cuda" if _cuda() else "cpu")
    model = model.to(dev).eval()
    batch = 16 if quick or not _cuda() else 256
    reps = 2 if quick or not _cuda() else 10
    x = torch.rand(batch, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    precisions = ["fp32"] + (["fp16", "bf16"] if _cuda() else [])
    figs, ref = {}, None
    for prec in precisions:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(prec)
        ctx = torch.autocast("cuda", dtype=dtype) if dtype else torch.autocast(dev.type, enabled=False)
        with torch.no_grad(), ctx:
            out = model(x)  # warm-up (cuDNN autotuning, lazy init)
            _sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                out = model(x)
            _sync()
        figs[f"{prec}_img_s"] = round(batch * reps / (time.perf_counter() - t0), 1)
        out = out[0] if isinstance(out, tuple) else out
        vec = torch.nn.functional.normalize(out.float().flatten(1), dim=-1)
        if ref is None:
            ref = vec
        else:
            figs[f"{prec}_cos_min"] = round(float((vec * ref).sum(-1).min()), 4)
    figs["failed"] = any(v < 0.99 for k, v in figs.items() if k.endswith("_cos_min"))
    note = "" if _cuda() else "CPU only: fp16/bf16 need a GPU"
    return figs, note


def _train_step_ms(prec: str, dev: torch.device, quick: bool) -> tuple[float, list[float], int]:
    """(ms per step, the losses, batch size) of retriever's train_step on the tiny model."""
    from retriever.models.load import load_model
    from retriever.training.loop import train_step
    from retriever.training.optim import OptimConfig, autocast_for, build_optimizer, make_scaler

    enc = load_model(TINY, device=dev, precision=prec)
    model = enc.model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(model, OptimConfig(lr=1e-4))
    scaler, autocast = make_scaler(prec, dev), autocast_for(prec, dev)
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    b = 16 if quick or not _cuda() else 128
    images = torch.rand(b, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
    texts = enc.tokenizer([f"caption {i}" for i in range(b)]).to(dev)

    def step():
        return train_step(
            model,
            opt,
            params,
            lambda x: model.encode_image(x, normalize=True),
            lambda t: model.encode_text(t, normalize=True),
            images,
            texts,
            autocast=autocast,
            scaler=scaler,
        )

    step()
    _sync()
    reps = 3 if quick or not _cuda() else 20
    t0 = time.perf_counter()
    losses = [step() for _ in range(reps)]
    _sync()
    return 1000 * (time.perf_counter() - t0) / reps, losses, b


def check_train_step(quick: bool):
    dev = torch.device("cuda" if _cuda() else "cpu")
    figs = {}
    b = 0
    for prec in ["fp32", "fp16", "bf16"] if _cuda() else ["fp32"]:
        ms, losses, b = _train_step_ms(prec, dev, quick)
        figs[f"{prec}_ms_step"] = round(ms, 2)
        if not all(np.isfinite(losses)):
            figs["failed"] = True
            return figs, f"{prec}: loss {losses}"
    return figs, f"batch {b}" + ("" if _cuda() else "; CPU only: fp16/bf16 need a GPU")


def check_faiss(quick: bool):
    faiss = _faiss()
    from retriever.indexes import BuildConfig, build_index, gpu
    from retriever.indexes.synthetic import ClipLike, write_synthetic_shards
    from retriever.indexes.tune import recall_at_k
    from retriever.search import Retriever

    if gpu.gpu_count() == 0:
        why = gpu.faiss_install_problem() or f"this faiss ({', '.join(gpu.installed_faiss()) or faiss.__version__})"
        raise Skip(f"faiss has no GPU here: {why} (install: README, GPU)")
    n = 20_000 if quick else 300_000
    d = 128
    gen = ClipLike(dim=d, latent=32, clusters=200, seed=1)
    figs: dict = {}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_shards(tmp / "s", gen, n, shard_rows=100_000)
        q = gen.sample(2000, stream=7)
        for kind in ("flat", "ivf", "ivfpq", "opq"):
            times = {}
            for where, use in (("cpu", False), ("gpu", kind != "flat")):
                t0 = time.perf_counter()
                m = build_index(
                    tmp / "s", tmp / f"{kind}-{where}", BuildConfig(index_type=kind, use_gpu=use), ("image",)
                )
                times[where] = time.perf_counter() - t0
                figs[f"{kind}_built_on_{where}"] = m.indexes["image"].built_on
            r_cpu = Retriever(tmp / f"{kind}-cpu", use_gpu=False)
            r_gpu = Retriever(tmp / f"{kind}-cpu", use_gpu=True)
            qps = {}
            res = {}
            for where, r in (("cpu", r_cpu), ("gpu", r_gpu)):
                r.search_raw(q[:10], 10, "image")  # load, place, warm up
                t0 = time.perf_counter()
                res[where] = r.search_raw(q, 10, "image")
                qps[where] = len(q) / (time.perf_counter() - t0)
            figs[f"{kind}_build_s"] = f"{times['cpu']:.1f}/{times['gpu']:.1f}"
            figs[f"{kind}_qps"] = f"{qps['cpu']:.0f}/{qps['gpu']:.0f}"
            rec = recall_at_k(res["gpu"][1], res["cpu"][1], 10)
            figs[f"{kind}_recall_gpu_vs_cpu"] = round(rec, 4)
            if gpu.device_name(r_gpu._index("image")) != "gpu":
                failed.append(f"{kind} did not move to the GPU")
            if kind == "flat" and not np.array_equal(res["gpu"][1], res["cpu"][1]):
                failed.append("Flat on the GPU is not exact")
            elif rec < 0.95:
                failed.append(f"{kind} recall {rec:.3f}")
            if kind == "ivfpq":
                if r_gpu.search_raw(q[:5], 2048, "image")[1].shape[1] != 2048:
                    failed.append("k=2048 not served")
                try:
                    r_gpu.search_raw(q[:5], 2049, "image")
                    failed.append("k=2049 was not refused")
                except Exception as e:
                    if "2048" not in str(e):
                        failed.append(f"k=2049: {e}")
        # Ownership: RFlat and OPQ wrappers to the GPU and back, originals dropped, then saved.
        xb = gen.sample(20_000, stream=3)
        for factory in ("IVF256,PQ16x8np,RFlat", f"OPQ16_{d},IVF256_HNSW32,PQ16x8np"):
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
            index.train(xb)
            index.add(xb)
            want = index.search(xb[:50], 10)[1]
            index = gpu.to_gpu(index)
            got = index.search(xb[:50], 10)[1]
            index = gpu.to_cpu(index)
            faiss.write_index(index, str(tmp / "x.faiss"))
            again = faiss.read_index(str(tmp / "x.faiss")).search(xb[:50], 10)[1]
            figs[f"roundtrip_{factory.split(',')[0]}"] = round(recall_at_k(got, want, 10), 3)
            if not np.array_equal(again, want):
                failed.append(f"{factory}: saved index differs after the GPU round trip")
    figs["failed"] = bool(failed)
    return figs, "; ".join(failed) + f" (n={n}, d={d}; build_s and qps are cpu/gpu)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    args = ap.parse_args()
    print(f"retriever GPU checks on {platform.node()} ({'CUDA' if _cuda() else 'no CUDA'})")
    run_check("env", check_env)
    run_check("defaults", check_defaults)
    run_check("pinned", check_pinned)
    for name, model, size in _image_models(args.quick):
        run_check(f"embed:{name}", check_embed, name, model, size, args.quick)
    run_check("train_step", check_train_step, args.quick)
    run_check("faiss", check_faiss, args.quick)

    print()
    print(f"{'check':<24}{'status':<8}figures / why")
    for row in ROWS:
        print(f"{row['check']:<24}{row['status']:<8}{_short(row)}")
    counts = {s: sum(r["status"] == s for r in ROWS) for s in ("pass", "fail", "skip")}
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": platform.node(), "rows": ROWS, **counts}, indent=2))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
