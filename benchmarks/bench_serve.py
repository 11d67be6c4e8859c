"""HTTP serving benchmark on loopback: `retriever serve` against in-process `Retriever.search`.

    python benchmarks/bench_serve.py --index retriever-demo/index --json bench-out/serve.json
    python benchmarks/bench_serve.py                      # builds a tiny-model index over Twemoji
    python benchmarks/bench_serve.py --index IDX --soak-seconds 600

Measured, side by side in one run:
  1. in-process: 8 client threads calling `Retriever.search(text=...)` on one Retriever;
  2. HTTP: the same texts POSTed to /v1/search of `retriever serve` (a child process, 127.0.0.1,
     its default dynamic batching) by N client threads with keep-alive connections;
     throughput ratio HTTP / in-process at 8 clients (goal >= 0.8), p50/p99 at 1, 8, 32 clients;
  3. the same server with --no-batching at 8 clients (the HTTP cost alone, against 1.) and at
     32 clients: batching speed-up (goal >= 2x);
  4. a soak (--soak-seconds, 0 skips it): 32 clients of mixed text / image / id queries:
     errors, and the server's RSS after warm-up and at the end (goal: growth < 5 %).
Every phase is bounded by --seconds (or --soak-seconds); all traffic stays on 127.0.0.1.
The client threads share the 2 cores with the server: absolute numbers are the machine's, the
ratios are the point.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from retriever.indexes.rows import iter_file_batches  # noqa: E402
from retriever.search import Retriever  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_tiny_index(workdir: Path) -> Path:
    from retriever.data.sources import read_source
    from retriever.demo.emoji import emoji_collection
    from retriever.embed import EmbedConfig, embed_items
    from retriever.indexes import build_index
    from retriever.models.load import load_model

    root = Path(__file__).resolve().parents[1]
    model = load_model(str(root / "tests/assets/tiny-clip.json"))
    folder = workdir / "images"
    folder.mkdir()
    import shutil

    for it in emoji_collection()[::4][:400]:
        dst = folder / Path(it.path).name
        shutil.copy(it.path, dst)
        dst.with_suffix(".txt").write_text(it.captions[0])
    embed_items(read_source(folder), model, workdir / "shards", EmbedConfig(num_workers=0))
    build_index(workdir / "shards", workdir / "index")
    return workdir / "index"


class Server:
    """`python -m retriever serve INDEX` as a child process on a free loopback port."""

    def __init__(self, index: Path, batching: bool, backend: str = "auto"):
        self.port = free_port()
        cmd = [sys.executable, "-m", "retriever", "serve", f"bench={index}", "--port", str(self.port),
               "--watch-seconds", "0", "--log-level", "warning", "--backend", backend]  # fmt: skip
        if not batching:
            cmd.append("--no-batching")
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.2)

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def run_clients(n: int, seconds: float, make_call) -> dict:
    """n threads call make_call(thread_index)() in a loop for `seconds`; latencies and errors."""
    stop = time.monotonic() + seconds
    lat: list[list[float]] = [[] for _ in range(n)]
    errors = [0] * n
    first_error: list[str] = []

    def worker(i: int):
        call = make_call(i)
        j = 0
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            try:
                call(j)
            except Exception as e:  # noqa: BLE001 (counted and reported)
                errors[i] += 1
                if not first_error:
                    first_error.append(repr(e)[:300])
            lat[i].append(time.perf_counter() - t0)
            j += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    all_lat = np.array([x for xs in lat for x in xs]) * 1000
    return {
        "clients": n,
        "queries": int(all_lat.size),
        "qps": all_lat.size / wall,
        "p50_ms": float(np.percentile(all_lat, 50)) if all_lat.size else float("nan"),
        "p99_ms": float(np.percentile(all_lat, 99)) if all_lat.size else float("nan"),
        "errors": int(sum(errors)),
        "first_error": first_error[0] if first_error else None,
    }


def http_caller(port: int, bodies: list[bytes], offset: int):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def call(j: int):
        body = bodies[(offset * 7919 + j) % len(bodies)]
        conn.request("POST", "/v1/search", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")

    return call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", type=Path, help="Index folder (default: build a tiny-model index over Twemoji).")
    ap.add_argument("--seconds", type=float, default=8.0, help="Duration of each measured phase.")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--soak-seconds", type=float, default=0.0, help="Soak duration (0: skip).")
    ap.add_argument("--soak-only", action="store_true", help="Run only the soak (phase 4).")
    ap.add_argument("--json", type=Path, help="Write the measurements here.")
    ap.add_argument("--backend", default="auto", help="Query encoder, in-process and in the server: auto, onnx, torch.")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory()
    index = args.index or build_tiny_index(Path(tmp.name))
    retriever = Retriever(index, backend=args.backend)
    retriever.model  # noqa: B018 (load before timing)
    batches = list(iter_file_batches(index / retriever.manifest.indexes["image"].rows_file))
    captions = [c for b in batches for c in b.column("caption").to_pylist() if c]
    rng = random.Random(0)
    texts = [f"{rng.choice(['a', 'the', 'one', 'some'])} {c}" for c in captions] or ["a photo"]
    rng.shuffle(texts)
    ids = [i for b in batches for i in b.column("id").to_pylist()]
    paths = [p for b in batches for p in b.column("path").to_pylist()]
    text_bodies = [json.dumps({"index": "bench", "text": t, "k": args.k}).encode() for t in texts]
    results: dict = {"index": str(index), "model": retriever.identity.label(), "backend": args.backend, "seconds": args.seconds,
                     "loadavg_before": os.getloadavg()}  # fmt: skip

    def inproc(i: int):
        return lambda j: retriever.search(text=texts[(i * 7919 + j) % len(texts)], k=args.k)

    print(f"index {index}: {len(ids)} items, model {retriever.identity.label()}")
    rows = []
    if args.soak_only:
        server = Server(index, batching=True, backend=args.backend)
        try:
            results["soak"] = soak(server, text_bodies, ids, paths, args)
        finally:
            server.stop()
        report(results, rows, args)
        return
    results["inprocess_8"] = run_clients(8, args.seconds, inproc)
    rows.append(("in-process Retriever.search", results["inprocess_8"]))

    server = Server(index, batching=True, backend=args.backend)
    try:
        run_clients(4, 2.0, lambda i: http_caller(server.port, text_bodies, i))  # warm-up
        for n in args.clients:
            results[f"http_{n}"] = run_clients(n, args.seconds, lambda i: http_caller(server.port, text_bodies, i))
            rows.append((f"HTTP /v1/search, batching on, {n} clients", results[f"http_{n}"]))
        if args.soak_seconds > 0:
            results["soak"] = soak(server, text_bodies, ids, paths, args)
    finally:
        server.stop()
    server = Server(index, batching=False, backend=args.backend)
    try:
        run_clients(4, 2.0, lambda i: http_caller(server.port, text_bodies, i))
        for n in (8, 32):
            r = run_clients(n, args.seconds, lambda i: http_caller(server.port, text_bodies, i))
            results[f"http_nobatch_{n}"] = r
            rows.append((f"HTTP /v1/search, batching off, {n} clients", r))
    finally:
        server.stop()

    report(results, rows, args)
    tmp.cleanup()


def report(results: dict, rows: list, args) -> None:
    if "http_8" in results:
        results["ratio_http_vs_inprocess_8"] = results["http_8"]["qps"] / results["inprocess_8"]["qps"]
    if "http_nobatch_8" in results:
        results["ratio_http_nobatch_vs_inprocess_8"] = results["http_nobatch_8"]["qps"] / results["inprocess_8"]["qps"]
    if "http_32" in results:
        results["ratio_batching_32"] = results["http_32"]["qps"] / results["http_nobatch_32"]["qps"]

    print(f"\n{'setup':46} {'clients':>7} {'queries':>8} {'QPS':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for name, r in rows:
        print(
            f"{name:46} {r['clients']:7d} {r['queries']:8d} {r['qps']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} {r['errors']:6d}"
        )
    if "ratio_http_vs_inprocess_8" in results:
        print(f"\nHTTP / in-process throughput at 8 clients: {results['ratio_http_vs_inprocess_8']:.2f} (goal >= 0.8)")
    if "ratio_http_nobatch_vs_inprocess_8" in results:
        print(f"HTTP without batching / in-process at 8 clients: {results['ratio_http_nobatch_vs_inprocess_8']:.2f}")
    if "ratio_batching_32" in results:
        print(f"batching on / off throughput at 32 clients: {results['ratio_batching_32']:.2f} (goal >= 2)")
    if "soak" in results:
        s = results["soak"]
        print(
            f"soak {s['seconds']:.0f} s, 32 clients mixed: {s['queries']} queries, {s['errors']} errors, "
            f"RSS {s['rss_start'] / 2**20:.0f} -> {s['rss_end'] / 2**20:.0f} MiB ({s['rss_growth_pct']:+.1f} %)"
        )
    for name, r in rows:
        if r["first_error"]:
            print(f"first error in {name}: {r['first_error']}")
    results["loadavg_after"] = os.getloadavg()
    print(f"load average before / after: {results['loadavg_before'][0]:.1f} / {results['loadavg_after'][0]:.1f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


def soak(server: Server, text_bodies: list[bytes], ids: list[int], paths: list[str], args) -> dict:
    """32 clients, a third each text, image upload (base64 JSON) and more-like-this by id."""
    images = [base64.b64encode(Path(p).read_bytes()).decode() for p in paths[:64]]
    image_bodies = [json.dumps({"index": "bench", "image": b, "k": args.k}).encode() for b in images]
    id_bodies = [json.dumps({"index": "bench", "id": i, "k": args.k}).encode() for i in ids[:500]]
    mixes = [text_bodies, image_bodies, id_bodies]
    warm = run_clients(32, min(20.0, args.soak_seconds / 5), lambda i: http_caller(server.port, mixes[i % 3], i))
    rss_start = server.rss()
    r = run_clients(32, args.soak_seconds, lambda i: http_caller(server.port, mixes[i % 3], i))
    rss_end = server.rss()
    r.update(
        seconds=args.soak_seconds,
        warmup_queries=warm["queries"],
        rss_start=rss_start,
        rss_end=rss_end,
        rss_growth_pct=100.0 * (rss_end - rss_start) / max(rss_start, 1),
    )
    return r


if __name__ == "__main__":
    main()
