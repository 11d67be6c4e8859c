"""Torch-free queries and ORT embedding, measured against the torch path on the same machine.

    python -m retriever demo --limit 200 --epochs 2 --workspace /tmp/demo15   # once: index + model export
    python benchmarks/bench_query.py --workspace /tmp/demo15 --json bench-out/query.json

Four parts, each printed as a table:

1. Cold CLI queries, whole-process wall time of a fresh `python -m retriever search` (text, image,
   and the torch backend), alternating round by round with `python -c "import torch, open_clip"`,
   the floor any torch query pays. Ratios are of medians over the rounds; targets: text <= 0.25x,
   image <= 0.35x of the import.
2. Agreement: 100 text and 100 image queries from the demo collection encoded by ONNX and torch:
   max abs difference of the query vectors (target <= 1e-5) and how many top-10 id lists agree.
3. Embedding throughput of the image tower, eager torch (channels_last, as `embed` runs it) against
   onnxruntime fp32 (and int8 dynamic quantisation with --int8), same batch, same thread count,
   alternating, for the demo model and ViT-B-32 (random init: no weights offline).
4. With --int8: the demo's held-out recall (text->image R@1/R@5 on its val split) for fp32 and int8.
5. Text queries on the export: the runtime dropping the padding columns a batch does not use
   (`dynamic_length` exports) against the same batch padded to the full context, one query and a
   batch of 32 (the server's micro-batches), alternating; ms per query and the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _wall(cmd: list[str]) -> tuple[float, str]:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    dt = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return dt, res.stderr


def cold_queries(index: Path, text: str, image: str, rounds: int) -> dict:
    py = sys.executable
    cmds = {
        "import torch, open_clip": [py, "-c", "import torch, open_clip"],
        "search text (onnx)": [py, "-m", "retriever", "search", str(index), text, "-k", "10", "--json"],
        "search image (onnx)": [py, "-m", "retriever", "search", str(index), "--image", image, "-k", "10", "--json"],
        "search text (torch)": [
            *[py, "-m", "retriever", "search", str(index), text, "-k", "10", "--json", "--backend", "torch"]
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for r in range(rounds):
        for name, cmd in cmds.items():
            dt, stderr = _wall(cmd)
            if "(onnx)" in name and "Using torch" in stderr:
                raise SystemExit(f"{name} fell back to torch: {stderr.strip()}")
            times[name].append(dt)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()), flush=True)
    base = statistics.median(times["import torch, open_clip"])
    return {
        name: {"median_s": statistics.median(v), "runs_s": v, "x_import": statistics.median(v) / base}
        for name, v in times.items()
    }


def agreement(index: Path, workspace: Path, n: int) -> dict:
    from retriever.search import Retriever

    rows = [json.loads(line) for line in (workspace / "data" / "all.jsonl").read_text().splitlines()]
    texts = [c for r in rows for c in r["caption"]][:n]
    images = [r["image"] for r in rows][:n]
    ro, rt = Retriever(index, backend="onnx"), Retriever(index, backend="torch")
    out = {}
    for kind, encode_args in (("text", texts), ("image", images)):
        method = "encode_texts" if kind == "text" else "encode_images"
        qo = getattr(ro.query_encoder, method)(encode_args)
        qt = getattr(rt.query_encoder, method)(encode_args)
        same = sum(
            [h.id for h in a] == [h.id for h in b] for a, b in zip(ro.search_vectors(qo, 10), rt.search_vectors(qt, 10))
        )
        out[kind] = {"queries": len(encode_args), "max_abs_diff": float(np.abs(qo - qt).max()), "same_top10": same}
    return out


def _quantized(folder: Path, out: Path) -> Path:
    """A copy of an export with both towers int8 dynamically quantised (weights int8, activations
    quantised on the fly); export.json's sizes and hashes updated so the runtime accepts it."""
    import hashlib
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out)
    info = json.loads((out / "export.json").read_text())
    for tower in ("text", "image"):
        path = out / info[tower]["file"]
        quantize_dynamic(str(folder / info[tower]["file"]), str(path), weight_type=QuantType.QInt8)
        data = path.read_bytes()
        info[tower].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / "export.json").write_text(json.dumps(info))
    return out


def throughput(encoder, onnx_encoders: dict, batch: int, rounds: int) -> dict:
    """Images/s of the image tower: torch eager vs each ORT encoder, alternating, best of rounds."""
    import torch

    from retriever.models.encode import encode_image_tensors

    size = next(iter(onnx_encoders.values())).image_info["preprocess"]["size"]
    pixels = torch.from_numpy(np.random.default_rng(0).standard_normal((batch, 3, *size), np.float32))
    fns = {"torch eager": lambda: encode_image_tensors(encoder, pixels)}
    for name, enc in onnx_encoders.items():
        fns[name] = lambda enc=enc: enc.encode_pixels(pixels.numpy())
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    base = batch / best["torch eager"]
    return {k: {"images_per_s": batch / v, "x_torch": (batch / v) / base} for k, v in best.items()}


def heldout_recall(encoder_like, val: list[dict]) -> dict:
    img = encoder_like.encode_images([r["image"] for r in val])
    txt = encoder_like.encode_texts([r["caption"][0] for r in val])
    ranks = np.argsort(-(txt @ img.T), axis=1)
    pos = np.array([int(np.where(ranks[i] == i)[0][0]) for i in range(len(val))])
    return {"t2i_R@1": float((pos < 1).mean()), "t2i_R@5": float((pos < 5).mean())}


def embed_part(workspace: Path, batch: int, rounds: int, int8: bool, vit: bool) -> dict:
    import torch

    from retriever.models.load import load_model
    from retriever.onnx.choose import cache_dir
    from retriever.onnx.export import export_onnx
    from retriever.onnx.runtime import ExportUnusable, OnnxEncoder

    threads = torch.get_num_threads()
    models = {"demo (EfficientNet-Lite0 + MiniLM)": (f"local-dir:{demo_model_dir(workspace)}", None)}
    if vit:
        models["ViT-B-32 (random init)"] = ("ViT-B-32", "random")
    out, recall = {}, {}
    for label, (name, pretrained) in models.items():
        encoder = load_model(name, pretrained, device="cpu")
        folder = cache_dir(encoder.identity)
        try:
            OnnxEncoder(folder, encoder.identity)
        except ExportUnusable:
            print(f"  exporting {label} to {folder}", flush=True)
            export_onnx(encoder, folder)
        encs = {"onnxruntime fp32": OnnxEncoder(folder, encoder.identity, threads=threads)}
        if int8:
            q = _quantized(folder, Path(tempfile.gettempdir()) / f"retriever-int8-{folder.name}")
            encs["onnxruntime int8"] = OnnxEncoder(q, encoder.identity, threads=threads)
        out[label] = throughput(encoder, encs, batch, rounds)
        if int8 and label.startswith("demo"):
            from retriever.onnx.choose import TorchQueryEncoder

            val = [json.loads(line) for line in (workspace / "data" / "val.jsonl").read_text().splitlines()]
            recall = {
                "torch fp32": heldout_recall(TorchQueryEncoder(encoder), val),
                "onnxruntime fp32": heldout_recall(encs["onnxruntime fp32"], val),
                "onnxruntime int8": heldout_recall(encs["onnxruntime int8"], val),
                "val_images": len(val),
            }
        del encoder
    return {"batch": batch, "threads": threads, "models": out, "heldout_recall": recall}


def demo_model_dir(workspace: Path) -> Path:
    """The demo's final model folder (run/best for a workspace without a finished report)."""
    from retriever.demo.run import demo_model_folder

    return demo_model_folder(workspace) or workspace / "run" / "best"


def text_lengths(workspace: Path, queries: list[str], rounds: int) -> dict:
    from retriever.onnx.runtime import OnnxEncoder, drop_padding_columns

    folder = next(d for d in (workspace / "index" / "onnx", demo_model_dir(workspace) / "onnx") if d.is_dir())
    enc = OnnxEncoder(folder)
    if not enc.text_info.get("dynamic_length"):
        raise SystemExit(f"{folder} was exported for a fixed token length; re-export it (retriever export-onnx).")
    pad = int(enc.text_info["tokenizer"].get("pad_id", 0))
    sess = enc._session("text")
    name = sess.get_inputs()[0].name
    out: dict = {}
    for batch in (1, 32):
        tokens = enc.tokenizer(queries[:batch])
        short = drop_padding_columns(tokens, pad)
        times: dict[str, list[float]] = {"full": [], "dropped": []}
        results = {}
        for _ in range(rounds):
            for kind, t in (("full", tokens), ("dropped", short)):
                start = time.perf_counter()
                results[kind] = sess.run(None, {name: t})[0]
                times[kind].append(time.perf_counter() - start)
        full, dropped = (min(times[k]) * 1000 / batch for k in ("full", "dropped"))
        out[str(batch)] = {"tokens_full": int(tokens.shape[1]), "tokens_dropped": int(short.shape[1]),
                           "full_ms_per_query": round(full, 3), "dropped_ms_per_query": round(dropped, 3),
                           "speedup": round(full / dropped, 2),
                           "max_abs_diff": float(np.abs(results["full"] - results["dropped"]).max())}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path("/tmp/demo15"), help="A `retriever demo` workspace.")
    ap.add_argument("--rounds", type=int, default=5, help="Alternating rounds of cold processes.")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--embed-rounds", type=int, default=5)
    ap.add_argument("--int8", action="store_true", help="Also int8 dynamic quantisation and its recall change.")
    ap.add_argument("--no-vit", action="store_true", help="Skip ViT-B-32 (its export takes minutes).")
    ap.add_argument("--skip", nargs="*", default=[], choices=["cold", "agreement", "embed", "text"])
    ap.add_argument("--json", type=Path, help="Write the results here.")
    args = ap.parse_args()

    ws = args.workspace
    index = ws / "index"
    if not any((d / "export.json").is_file() for d in (index / "onnx", demo_model_dir(ws) / "onnx")):
        raise SystemExit(
            f"No ONNX export of the demo model; run `retriever demo --workspace {ws}` or `retriever index`."
        )
    val = [json.loads(line) for line in (ws / "data" / "val.jsonl").read_text().splitlines()]
    results: dict = {"workspace": str(ws), "load_average": os.getloadavg()}
    if "cold" not in args.skip:
        print("Cold CLI queries (whole process, alternating rounds):", flush=True)
        results["cold"] = cold_queries(index, "a red heart", val[0]["image"], args.rounds)
        print(f"\n{'process':<26} {'median s':>9} {'x import':>9}   runs")
        for name, r in results["cold"].items():
            runs = " ".join(f"{x:.2f}" for x in r["runs_s"])
            print(f"{name:<26} {r['median_s']:>9.2f} {r['x_import']:>9.3f}   {runs}")
    if "agreement" not in args.skip:
        results["agreement"] = agreement(index, ws, args.queries)
        print(f"\n{'queries':<10} {'n':>4} {'max abs diff':>13} {'same top-10':>12}")
        for kind, r in results["agreement"].items():
            print(f"{kind:<10} {r['queries']:>4} {r['max_abs_diff']:>13.2e} {r['same_top10']:>8}/{r['queries']}")
    if "embed" not in args.skip:
        e = embed_part(ws, args.batch, args.embed_rounds, args.int8, not args.no_vit)
        results["embed"] = e
        print(f"\nImage-tower throughput, batch {e['batch']}, {e['threads']} threads (best of {args.embed_rounds}):")
        print(f"{'model':<36} {'backend':<18} {'images/s':>9} {'x torch':>8}")
        for model, rows in e["models"].items():
            for backend, r in rows.items():
                print(f"{model:<36} {backend:<18} {r['images_per_s']:>9.1f} {r['x_torch']:>8.2f}")
        if e["heldout_recall"]:
            hr = e["heldout_recall"]
            print(f"\nDemo held-out recall ({hr['val_images']} val images), text -> image:")
            for backend, r in hr.items():
                if backend != "val_images":
                    print(f"{backend:<18} R@1 {r['t2i_R@1']:.3f}  R@5 {r['t2i_R@5']:.3f}")
    if "text" not in args.skip:
        captions = [json.loads(x)["caption"] for x in (ws / "data" / "val.jsonl").read_text().splitlines()]
        queries = [c[0] if isinstance(c, list) else c for c in captions]
        results["text"] = text_lengths(ws, queries, args.embed_rounds * 4)
        print(f"\nText queries on the export (best of {args.embed_rounds * 4}, alternating):")
        print(f"{'batch':>5} {'tokens':>9} {'full ms/q':>10} {'dropped ms/q':>13} {'speed-up':>9} {'max diff':>9}")
        for b, r in results["text"].items():
            print(f"{b:>5} {r['tokens_full']:>4}->{r['tokens_dropped']:<4} {r['full_ms_per_query']:>10.2f} "
                  f"{r['dropped_ms_per_query']:>13.2f} {r['speedup']:>9.2f} {r['max_abs_diff']:>9.1e}")  # fmt: skip
    results["load_average_after"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
