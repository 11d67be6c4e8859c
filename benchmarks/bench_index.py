"""Index benchmark on CLIP-like synthetic vectors: build time, peak RSS, size, QPS, recall@10.

    python benchmarks/bench_index.py --n 100000 1000000 --json bench-out/index.json
    python benchmarks/bench_index.py --large        # adds N = 10M (see RESULTS.md for its cost)

Per N: shards are written once (reused on later runs), held-out queries come from the same
clusters, exact top-10 is computed by streaming the shards. Each index is built in a child
process through the library (build_index, with --target-recall tuning) so its peak RSS is its
own. Then, side by side in this process: our search path (Retriever.search_raw, and search_vectors
with metadata) against raw `index.search` on the same faiss object and queries; QPS relative to
exact Flat; metadata lookup time for k = 10 and k = 2000.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.indexes import BuildConfig, build_index  # noqa: E402
from retriever.indexes.memory import format_bytes, parse_memory  # noqa: E402
from retriever.indexes.synthetic import ClipLike, write_synthetic_shards  # noqa: E402
from retriever.indexes.tune import exact_knn, recall_at_k  # noqa: E402
from retriever.search import Retriever  # noqa: E402
from retriever.shards import ShardSet  # noqa: E402

DEFAULT_TYPES = {
    100_000: "flat,hnsw,ivf,ivfpq,opq,ivfpq-disk,auto@200M",
    1_000_000: "flat,ivf,ivfpq,auto@1G",
    10_000_000: "auto@4G",
}


def vm_hwm() -> int:
    """This process's peak resident memory in bytes. Not getrusage's ru_maxrss: Linux carries
    that across fork+exec, so a child started by a big parent reports the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_build(shards: str, out: str, kind: str, target: float, k: int, nq: int) -> None:
    """Runs in a fresh process: build one index, print build seconds and peak RSS as JSON."""
    # kind: TYPE, TYPE-disk (on-disk inverted lists) or TYPE@BUDGET (e.g. auto@4G)
    base_rss = vm_hwm()  # interpreter + torch (imported by retriever.models.load) + faiss + pyarrow
    index_type, _, budget = kind.partition("@")
    on_disk = index_type.endswith("-disk")
    cfg = BuildConfig(
        index_type=index_type.removesuffix("-disk"),
        max_memory=parse_memory(budget) if budget else None,
        on_disk=on_disk,
        target_recall=target,
        k=k,
        tune_queries=nq,
    )
    t0 = time.perf_counter()
    m = build_index(shards, out, cfg, modalities=("image",))
    secs = time.perf_counter() - t0
    rss = vm_hwm()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    # Now, not peak: anonymous memory vs file pages mapped in (re-rank vectors, .ivfdata).
    rss_split = {k: int(status[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile") if k in status}
    print(
        json.dumps(
            {"build_s": secs, "peak_rss": rss, "base_rss": base_rss, "rss_end": rss_split, "manifest": m.to_dict()}
        )
    )


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def side_by_side(fns: dict, repeat: int) -> dict:
    """Best-of-`repeat` seconds per function, runs interleaved after one warm-up call each, so
    that drift in clock speed or caches hits every contender alike."""
    for fn in fns.values():
        fn()  # warm-up: thread pools, BLAS, first page-in of memory-mapped files
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def bench_n(n: int, types: list[str], args) -> list[dict]:
    root = Path(args.workdir) / f"n{n}"
    gen = ClipLike(dim=512, clusters=max(100, n // 500), seed=0)
    shards = root / "shards"
    if not (shards / "part-00000.parquet").exists() or ShardSet(shards).num_rows != n:
        t0 = time.perf_counter()
        write_synthetic_shards(shards, gen, n, shard_rows=100_000)
        print(f"[n={n}] wrote shards in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    ss = ShardSet(shards)
    queries = gen.sample(args.queries, stream=10**6)
    t0 = time.perf_counter()
    _, truth = exact_knn(queries, (v for v, _ in ss.iter_vectors("image", extra_columns=())), 10)
    print(f"[n={n}] exact ground truth in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    rows = []
    flat_qps = None
    for kind in types:
        out = root / f"index-{kind.replace('@', '-')}"
        t0 = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--_child",
                str(shards),
                str(out),
                kind,
                str(args.target_recall),
                "10",
                str(args.tune_queries),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append(
                {"n": n, "type": kind, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
            )
            continue
        child = json.loads(proc.stdout.strip().splitlines()[-1])
        entry = child["manifest"]["indexes"]["image"]
        print(f"[n={n}] built {kind} ({entry['factory']}) in {time.perf_counter() - t0:.0f}s", file=sys.stderr)

        r = Retriever(out)
        index = r._index("image")  # the very faiss object our path searches, parameters set
        q = np.ascontiguousarray(queries)
        _, found = r.search_raw(q, 10, "image")
        fns = {
            "ours": lambda: r.search_raw(q, 10, "image"),  # noqa: B023, F821 (timed inside this iteration)
            "meta": lambda: r.search_vectors(q, 10, "image"),  # noqa: B023, F821
        }
        faiss_native = entry.get("rerank", "") != "mmap"
        if faiss_native:  # with mmap re-ranking, the re-rank is ours: there is no raw-faiss equivalent
            fns["raw"] = lambda: index.search(q, 10)  # noqa: B023, F821
        t = side_by_side(fns, args.repeat)
        ours, with_meta, raw = t["ours"], t["meta"], t.get("raw")
        qps = len(q) / ours
        if kind == "flat":
            flat_qps = qps
        files = [out / entry["file"], *(out / f for f in entry.get("vectors_files", []))]
        if entry.get("ivfdata_file"):
            files.append(out / entry["ivfdata_file"])
        tuning = entry["extra"].get("tuning", {})
        rows.append(
            {
                "n": n,
                "type": kind,
                "factory": entry["factory"],
                "rerank": entry.get("rerank") or ("RFlat" if entry["factory"].endswith("RFlat") else ""),
                "on_disk": bool(entry.get("ivfdata_file")),
                "params": entry["search_params"],
                "build_s": round(child["build_s"], 1),
                "peak_rss": child["peak_rss"],
                "peak_rss_above_imports": child["peak_rss"] - child["base_rss"],
                "rss_at_end": child.get("rss_end", {}),
                "index_bytes": sum(f.stat().st_size for f in files),
                "rows_bytes": (out / entry["rows_file"]).stat().st_size,
                "qps": round(qps, 1),
                "recall@10": round(recall_at_k(found, truth, 10), 4),
                "tuned_recall@10": tuning.get("recall"),
                "tuning_reached": tuning.get("reached"),
                "ours_s": ours,
                "raw_faiss_s": raw,
                "ours_vs_raw": round(ours / raw, 3) if raw else None,
                "with_metadata_vs_raw": round(with_meta / raw, 3) if raw else None,
                "tuning_tried": tuning.get("tried", []),
            }
        )
        del r, index
    if flat_qps:
        for row in rows:
            if "qps" in row:
                row["speedup_vs_flat"] = round(row["qps"] / flat_qps, 1)
    rows.append({"n": n, "type": "metadata", **lookup_times(root, types)})
    return rows


def lookup_times(root: Path, types: list[str]) -> dict:
    """Metadata for k results of one query: Retriever.lookup on the memory-mapped rows file."""
    kind = next((t for t in types if t == "flat"), types[0])
    r = Retriever(root / f"index-{kind.replace('@', '-')}")
    n = r.manifest.indexes["image"].count
    rng = np.random.default_rng(0)
    out = {}
    cold_rows = rng.choice(n, size=min(10, n), replace=False)
    t0 = time.perf_counter()
    r.lookup("image", cold_rows)
    out["lookup_first_call_ms"] = round(1000 * (time.perf_counter() - t0), 3)  # includes opening the mmap
    for k in (10, 2000):
        rows = rng.choice(n, size=min(k, n), replace=False)
        out[f"lookup_k{k}_ms"] = round(1000 * timed(lambda: r.lookup("image", rows), repeat=20), 3)  # noqa: B023
    return out


def print_table(rows: list[dict]) -> None:
    head = f"{'N':>9} {'type':<10} {'factory':<34} {'params':<36} {'build s':>7} {'+RSS':>9} {'index':>9} {'QPS':>8} {'×Flat':>6} {'R@10':>6} {'ours/raw':>8} {'+meta/raw':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        if r["type"] == "metadata":
            print(
                f"{r['n']:>9} metadata lookup: k=10 {r['lookup_k10_ms']} ms, k=2000 {r['lookup_k2000_ms']} ms (first call {r['lookup_first_call_ms']} ms)"
            )
            continue
        if "error" in r:
            print(f"{r['n']:>9} {r['type']:<10} ERROR {r['error']}")
            continue
        params = ",".join(f"{k}={v}" for k, v in r["params"].items()) or "exact"
        fac = r["factory"] + (" +mmap" if r["rerank"] == "mmap" else "") + (" disk" if r["on_disk"] else "")
        print(
            f"{r['n']:>9} {r['type']:<10} {fac[:34]:<34} {params[:36]:<36} {r['build_s']:>7.1f} {format_bytes(r['peak_rss_above_imports']):>9} "
            f"{format_bytes(r['index_bytes']):>9} {r['qps']:>8.0f} {r.get('speedup_vs_flat', float('nan')):>6.1f} {r['recall@10']:>6.3f} "
            f"{(r['ours_vs_raw'] or float('nan')):>8.3f} {(r['with_metadata_vs_raw'] or float('nan')):>9.3f}"
        )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        a = sys.argv[2:]
        child_build(a[0], a[1], a[2], float(a[3]), int(a[4]), int(a[5]))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--large", action="store_true", help="also N = 10M with --max-memory 4G (about 40 GB of disk)")
    p.add_argument("--types", default=None, help="comma list for every N, e.g. flat,ivf,ivfpq,auto@4G (default: per N)")
    p.add_argument("--queries", type=int, default=500, help="held-out queries for QPS and recall")
    p.add_argument("--tune-queries", type=int, default=500, help="queries drawn from the data for tuning")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions (best kept)")
    p.add_argument("--workdir", default="bench-out/index")
    p.add_argument("--json", dest="json_path", default=None)
    p.add_argument("--table-from", default=None, help="print the table of an earlier --json file and exit")
    args = p.parse_args()
    if args.table_from:
        print_table(json.loads(Path(args.table_from).read_text())["rows"])
        return
    ns = list(args.n) + ([10_000_000] if args.large else [])
    rows = []
    t0 = time.time()
    load0 = os.getloadavg()
    for n in ns:
        types = (args.types or DEFAULT_TYPES.get(n, "flat,ivf,ivfpq")).split(",")
        rows += bench_n(n, types, args)
    print_table(rows)
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
            "cpus": os.cpu_count(),
            "argv": sys.argv,
            "seconds": round(time.time() - t0),
            "loadavg_at_start": load0,
            "loadavg_at_end": os.getloadavg(),  # other jobs on the machine skew absolute QPS, not much the ratios
        }
        tmp = Path(args.json_path).with_suffix(".tmp")
        tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
        os.replace(tmp, args.json_path)


if __name__ == "__main__":
    main()
