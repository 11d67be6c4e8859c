"""`retriever embed` in one process against 2 torchrun processes (gloo), same images and model.

    python benchmarks/bench_embed_parts.py --json bench-out/embed-parts.json
    python benchmarks/bench_embed_parts.py --model RN50 --images 128 --repeat 2

Both sides run the CLI as a user would (`python -m retriever.cli.app embed ...` and
`python -m torch.distributed.run --standalone --nproc_per_node 2 -m retriever.cli.app embed ...`)
over Twemoji PNGs listed in a JSONL manifest (no captions, image work only), with 0 decode
workers. The single process uses torch's default intra-op threads (all cores); each torchrun rank
gets OMP_NUM_THREADS = cores / 2, so both sides use every core. Wall time includes process start
and model load, which every real run pays too; the table also gives the embedding phase alone
(images / images_per_second as reported by the run: rank 0's for torchrun, whose ranks run in
parallel) and the CPU seconds of the whole process tree (user + system, from the children's
rusage), which other jobs on the machine do not inflate. Runs alternate (1, 2, 1, 2, ...) so drift hits both sides alike.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run(cmd: list[str], env: dict) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of the whole process tree, the run's JSON report)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-2000:])
    return wall, cpu, json.loads(proc.stdout[proc.stdout.index("{") :])


def main() -> None:
    from retriever.demo.emoji import emoji_collection

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="RN50")
    ap.add_argument("--pretrained", default="random")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp())
    manifest = tmp / "m.jsonl"
    manifest.write_text("".join(json.dumps({"image": it.path}) + "\n" for it in emoji_collection()[: args.images]))
    base = [sys.executable]
    cli = ["-m", "retriever.cli.app", "embed", str(manifest), "--model", args.model, "--workers", "0"]
    cli += ["--pretrained", args.pretrained]
    cli += ["--shard-size", str(args.shard_size), "--json"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    results = {"1 process": [], "2 torchrun ranks": []}
    try:
        for r in range(args.repeat):
            out = tmp / f"one{r}"
            wall, cpu, rep = run(base + cli + ["--out", str(out)], env)
            results["1 process"].append({"wall": wall, "cpu": cpu, "embed": args.images / rep["images_per_second"]})
            out = tmp / f"two{r}"
            tr = base + ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
            wall, cpu, rep = run(tr + cli + ["--out", str(out)], {**env, "OMP_NUM_THREADS": str(max(1, cores // 2))})
            assert rep["parts"]["complete"] == [0, 1]
            # rank 0 embedded its half at images_per_second; the ranks run side by side.
            results["2 torchrun ranks"].append(
                {
                    "wall": wall,
                    "cpu": cpu,
                    "embed": (rep["images_per_second"] and args.images / 2 / rep["images_per_second"]),
                }
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{args.model}, {args.images} images, shard size {args.shard_size}, {cores} cores, {args.repeat} runs each")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} on {cores} cores (other jobs inflate wall times)")
    head = f"{'setup':<18} {'wall s':>7} {'embed s':>8} {'CPU s':>7} {'img/s wall':>11} {'img/s embed':>12} {'CPU ms/img':>11}"
    print(head)
    for name, rs in results.items():
        wall = min(x["wall"] for x in rs)
        emb = min(x["embed"] for x in rs)
        cpu = min(x["cpu"] for x in rs)
        print(
            f"{name:<18} {wall:>7.1f} {emb:>8.1f} {cpu:>7.1f} {args.images / wall:>11.1f} {args.images / emb:>12.1f} "
            f"{cpu / args.images * 1000:>11.0f}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "cores": cores, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
