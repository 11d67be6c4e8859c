"""Crash harness: SIGKILL `embed`, `index`, `index --add` and `train` at random moments, resume, compare.

For each command an uninterrupted reference run is made first. Then, N times: the command is
started as a real `python -m retriever` process, killed with SIGKILL after a random delay drawn
from [0, reference duration], the state it left is checked (an index is either absent, the old one
or the new one, never a broken one), and the same command is rerun to completion (train with
--resume when a checkpoint exists). A trial passes when the result equals the reference exactly
(rows, ids, paths, vectors; train: every weight tensor bit for bit) and no temp file is left.

    PYTHONPATH=. python benchmarks/crash_harness.py --kills 50 --json crash.json

prints one line per command, `k/N resumed identical`. tests/test_crash_harness.py runs it with a
small N in CI; benchmarks/RESULTS.md keeps a long run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "assets" / "tiny-clip.json"
LOCK_FILES = {".retriever.lock"}


@dataclass
class Outcome:
    command: str
    kills: int = 0
    identical: int = 0
    killed_mid_run: int = 0  # kills that landed before the command finished on its own
    failures: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"{self.command:<12} {self.identical}/{self.kills} resumed identical "
            f"({self.killed_mid_run} killed mid-run){'  FAIL: ' + self.failures[0] if self.failures else ''}"
        )


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "retriever", *map(str, args)]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def run_to_end(cmd: list[str], timeout: float = 300) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed: {res.stderr[-500:]}")
    return time.perf_counter() - t


def kill_after(cmd: list[str], delay: float) -> bool:
    """Start cmd, SIGKILL it after `delay` seconds; True if it was still running then."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env())
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True


def temp_leftovers(*folders: Path) -> list[str]:
    """Hidden temp files/folders inside or beside `folders` (lock files are not leftovers)."""
    found = []
    for folder in folders:
        for d in (folder, folder.parent):
            if d.is_dir():
                found += [p.name for p in d.iterdir() if p.name.endswith((".tmp", ".old"))]
    return sorted(set(found))


# What a folder holds, for comparison -------------------------------------------------------------


def shard_rows(folder: Path) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    from retriever.shards import fixed_list_to_numpy

    tables = [pq.read_table(p) for p in sorted(folder.glob("part-*.parquet"))]
    return {
        "id": np.concatenate([t.column("id").to_numpy() for t in tables]),
        "path": np.concatenate([np.array(t.column("path").to_pylist()) for t in tables]),
        "image": np.concatenate([fixed_list_to_numpy(t.column("image_embedding")) for t in tables]),
    }


def index_rows(folder: Path) -> dict[str, np.ndarray]:
    import faiss
    import pyarrow as pa

    out = {}
    manifest = json.loads((folder / "manifest.json").read_text())
    for modality, entry in manifest["indexes"].items():
        index = faiss.read_index(str(folder / entry["file"]))
        out[f"{modality}.vectors"] = index.reconstruct_n(0, index.ntotal)
        table = pa.ipc.open_file(pa.memory_map(str(folder / entry["rows_file"]))).read_all()
        out[f"{modality}.id"] = table.column("id").to_numpy()
        out[f"{modality}.path"] = np.array(table.column("path").to_pylist())
    return out


def model_weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "open_clip_model.safetensors"))


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str | None:
    if a.keys() != b.keys():
        return f"different keys {sorted(a.keys() ^ b.keys())[:3]}"
    for k in a:
        if a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]):
            return f"{k} differs"
    return None


# The four campaigns ------------------------------------------------------------------------------


def campaign(name: str, n: int, rng: random.Random, trial: Callable[[Path, float], str | None], ref_seconds: float):
    outcome = Outcome(name)
    for i in range(n):
        with tempfile.TemporaryDirectory(prefix=f"crash-{name}-") as tmp:
            delay = rng.uniform(0.0, ref_seconds)
            try:
                problem = trial(Path(tmp), delay)
            except Exception as e:  # noqa: BLE001 (a harness reports every failure and goes on)
                problem = f"{type(e).__name__}: {str(e)[:300]}"
        outcome.kills += 1
        print(
            f"  {name} trial {i + 1}/{n}: kill at {delay:.2f}s -> {problem or 'identical'}", file=sys.stderr, flush=True
        )
        if problem is None:
            outcome.identical += 1
        elif problem == "finished":
            outcome.identical += 1
        else:
            outcome.failures.append(f"trial {i} (kill at {delay:.2f}s): {problem}")
        if problem != "finished":
            outcome.killed_mid_run += 1
    return outcome


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=5, help="SIGKILLs per command")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--commands", default="embed,index,add,train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="crash-ref-"))
    try:
        outcomes = run_all(work, args, rng)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for o in outcomes:
        print(o.line())
        for f in o.failures[:5]:
            print("   ", f)
    result = {
        o.command: {
            "kills": o.kills,
            "identical": o.identical,
            "killed_mid_run": o.killed_mid_run,
            "failures": o.failures,
        }
        for o in outcomes
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def make_source(work: Path, n_images: int) -> tuple[Path, Path, Path]:
    """A folder of n real emoji PNGs with captions, and two manifests splitting it (base, added)."""
    from retriever.demo.emoji import emoji_collection

    everything = emoji_collection()
    items = everything[:: max(1, len(everything) // n_images)][:n_images]
    folder = work / "images"
    folder.mkdir()
    for i, it in enumerate(items):
        shutil.copy(it.path, folder / f"{i:04d}.png")
        (folder / f"{i:04d}.txt").write_text(it.captions[0])
    half = n_images // 2
    base, added = work / "base.jsonl", work / "added.jsonl"
    for path, part in ((base, range(half)), (added, range(half, n_images))):
        path.write_text(
            "".join(
                json.dumps({"image": str(folder / f"{i:04d}.png"), "caption": items[i].captions[0]}) + "\n"
                for i in part
            )
        )
    return folder, base, added


def run_all(work: Path, args, rng: random.Random) -> list[Outcome]:
    folder, base, added = make_source(work, args.images)
    model = ["--model", TINY, "--workers", "0"]
    commands = args.commands.split(",")
    campaigns = {"embed": embed_campaign, "index": index_campaign, "add": add_campaign, "train": train_campaign}
    return [campaigns[c](work, folder, base, added, model, args.kills, rng) for c in commands]


def embed_campaign(work, folder, base, added, model, kills, rng) -> Outcome:
    """Many small shards, so that kills land between and inside shard writes."""

    def embed_cmd(out):
        return cli("embed", folder, "--out", out, *model, "--shard-size", "4", "--batch-size", "4")

    t = run_to_end(embed_cmd(work / "ref-shards"))
    ref = shard_rows(work / "ref-shards")

    def trial(tmp: Path, delay: float):
        out = tmp / "shards"
        mid = kill_after(embed_cmd(out), delay)
        run_to_end(embed_cmd(out))
        return same(ref, shard_rows(out)) or _leftovers(out) or (None if mid else "finished")

    return campaign("embed", kills, rng, trial, t)


def index_campaign(work, folder, base, added, model, kills, rng) -> Outcome:
    """A kill leaves no index or the complete new one; the rerun builds the same index."""
    shards = work / "index-shards"
    run_to_end(cli("embed", folder, "--out", shards, *model))

    def index_cmd(out):
        return cli("index", shards, "--out", out, "--index-type", "flat")

    t = run_to_end(index_cmd(work / "ref-index"))
    ref = index_rows(work / "ref-index")

    def trial(tmp: Path, delay: float):
        out = tmp / "index"
        mid = kill_after(index_cmd(out), delay)
        if out.exists() and (problem := same(ref, index_rows(out))):
            return f"after the kill: {problem}"
        run_to_end(index_cmd(out))
        return same(ref, index_rows(out)) or _leftovers(out) or (None if mid else "finished")

    return campaign("index", kills, rng, trial, t)


def add_campaign(work, folder, base, added, model, kills, rng) -> Outcome:
    """The base half's index, then the other half added: a kill leaves the old or the new index."""
    run_to_end(cli("embed", base, "--out", work / "base-shards", *model))
    run_to_end(cli("embed", added, "--out", work / "added-shards", *model))
    run_to_end(cli("index", work / "base-shards", "--out", work / "base-index", "--index-type", "flat"))
    ref_dir = work / "ref-added"
    shutil.copytree(work / "base-index", ref_dir)

    def add_cmd(idx):
        return cli("index", "--add", "--renumber", work / "added-shards", idx)

    t = run_to_end(add_cmd(ref_dir))
    ref, old = index_rows(ref_dir), index_rows(work / "base-index")

    def trial(tmp: Path, delay: float):
        idx = tmp / "index"
        shutil.copytree(work / "base-index", idx)
        mid = kill_after(add_cmd(idx), delay)
        now = index_rows(idx)
        if same(now, old) is None:
            run_to_end(add_cmd(idx))
        elif (problem := same(now, ref)) is not None:
            return f"after the kill the index is neither old nor new: {problem}"
        return same(ref, index_rows(idx)) or _leftovers(idx) or (None if mid else "finished")

    return campaign("index --add", kills, rng, trial, t)


def train_campaign(work, folder, base, added, model, kills, rng) -> Outcome:
    """Checkpoints every 2 steps, so that kills land before, between and after them."""

    def train_cmd(out: Path, resume: bool = False):
        extra = ["--resume"] if resume else []
        return cli(
            "train", folder, "--out", out, *model, "--epochs", "2", "--batch-size", "4",
            "--no-augment", "--save-every", "2", *extra,
        )  # fmt: skip

    t = run_to_end(train_cmd(work / "ref-run"))
    ref = model_weights(work / "ref-run" / "last")

    def trial(tmp: Path, delay: float):
        out = tmp / "run"
        mid = kill_after(train_cmd(out), delay)
        # Resumed when a run.json exists (killed before the first checkpoint: the run restarts).
        run_to_end(train_cmd(out, resume=(out / "run.json").is_file()))
        return same(ref, model_weights(out / "last")) or _leftovers(out / "last") or (None if mid else "finished")

    return campaign("train", kills, rng, trial, t)


def _leftovers(folder: Path) -> str | None:
    left = temp_leftovers(folder)
    return f"temp files left: {left[:3]}" if left else None


if __name__ == "__main__":
    main()
