"""Peak memory of reading a big Parquet manifest: the streamed Arrow reader against the old dict reader.

    python benchmarks/bench_manifest.py --rows 1000000 --json bench-out/manifest.json
    python benchmarks/bench_manifest.py --rows 10000000 --skip-old

A manifest of N rows is generated (image path ~45 chars, caption ~40 chars, url, width, height and a
512-byte binary `thumbnail` column that neither reader needs), then each reader runs in a fresh
child process that reports its peak RSS (VmHWM, reset after imports) and time:
- `old`: what read_manifest did before streaming: `pq.read_table(path).to_pylist()` into one dict
  per row, then one SourceItem per image;
- `new`: `read_source(path)`: projected, batched, kept as Arrow columns (data/manifests.py); the
  child then touches every 1000th item to show they materialise.
The child's baseline RSS (interpreter + pyarrow imported) is printed beside the peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_manifest(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    step = 500_000
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        ids = np.arange(lo, lo + n)
        table = pa.table(
            {
                "image": pa.array([f"images/{i // 10000:05d}/{i:012d}_photo.jpg" for i in ids]),
                "caption": pa.array([f"a photograph of thing number {i} on a table" for i in ids]),
                "url": pa.array([f"https://example.com/img/{i}.jpg" for i in ids]),
                "width": pa.array(ids % 1000 + 200),
                "height": pa.array(ids % 700 + 200),
                "thumbnail": pa.array([b"\0" * 512] * n, pa.binary()),
            }
        )
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=65_536)
    writer.close()


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(mode: str, path: str) -> None:
    import pyarrow.parquet as pq

    from retriever.data.sources import SourceItem, read_source

    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    t0 = time.perf_counter()
    if mode == "old":
        rows = pq.read_table(path).to_pylist()
        by_path: dict[str, list[str]] = {}
        for r in rows:
            by_path.setdefault(str(Path(path).parent / r["image"]), []).append(r["caption"])
        items = [SourceItem(i, p, tuple(c)) for i, (p, c) in enumerate(by_path.items())]
    else:
        items = read_source(path)
        for i in range(0, len(items), 1000):
            items[i].path  # noqa: B018 (materialise a sample)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    print(json.dumps({"mode": mode, "items": len(items), "seconds": seconds, "base_kb": base, "peak_kb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--skip-old", action="store_true", help="the dict reader needs ~1.5 KB/row")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "manifest.parquet"
        t0 = time.perf_counter()
        write_manifest(path, args.rows)
        print(f"wrote {args.rows:,} rows ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t0:.0f}s")
        results = []
        for mode in ["new"] if args.skip_old else ["old", "new"]:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True, check=True
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\n{'reader':<6} {'rows':>11} {'seconds':>8} {'base MB':>8} {'peak MB':>8} {'bytes/row':>9}")
    for r in results:
        per_row = (r["peak_kb"] - r["base_kb"]) * 1024 / max(r["items"], 1)
        print(
            f"{r['mode']:<6} {r['items']:>11,} {r['seconds']:>8.1f} {r['base_kb'] / 1024:>8.0f} "
            f"{r['peak_kb'] / 1024:>8.0f} {per_row:>9.0f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"rows": args.rows, "results": results}, indent=2))


if __name__ == "__main__":
    main()
