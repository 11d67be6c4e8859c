"""`retriever train` under torchrun: 2 CPU processes (gloo) give the run that 1 process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from retriever.errors import UserError
from retriever.training.loop import TrainConfig, train
from retriever.training.optim import OptimConfig

ROOT = Path(__file__).resolve().parents[2]


pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.e2e]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    from retriever.demo.emoji import emoji_collection, write_manifest

    try:
        items = emoji_collection()
    except UserError as e:
        pytest.skip(str(e))
    return write_manifest(items[:200], tmp_path_factory.mktemp("dist") / "pairs.jsonl")


def test_two_gloo_processes_match_a_single_process_run(tiny, manifest, tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    args = dict(epochs=2, batch_size=32, lr=1e-3, seed=0, val_fraction=0.2)
    single = train(
        TrainConfig(
            source=str(manifest),
            out=str(tmp_path / "single"),
            model=tiny.config,
            augment=False,
            workers=0,
            epochs=args["epochs"],
            batch_size=args["batch_size"],
            seed=args["seed"],
            val_fraction=args["val_fraction"],
            optim=OptimConfig(lr=args["lr"]),
        )
    )

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "retriever.cli.app",
        "train",
        str(manifest),
        "--out",
        str(tmp_path / "dist"),
        "--model",
        tiny.config,
        "--no-augment",
        "--workers",
        "0",
        "--epochs",
        str(args["epochs"]),
        "--batch-size",
        str(args["batch_size"]),
        "--lr",
        str(args["lr"]),
        "--seed",
        str(args["seed"]),
        "--val-fraction",
        str(args["val_fraction"]),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    hist_single = single.history
    hist_dist = json.loads((tmp_path / "dist" / "metrics.json").read_text())["history"]
    assert len(hist_dist) == len(hist_single) == 3
    for a, b in zip(hist_dist[1:], hist_single[1:]):
        # Each rank saw half of every global batch; the gathered loss is the global batch's loss.
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    w_single = load_file(str(tmp_path / "single" / "last" / "open_clip_model.safetensors"))
    w_dist = load_file(str(tmp_path / "dist" / "last" / "open_clip_model.safetensors"))
    start = tiny.load().model.state_dict()  # both runs started from these (seeded random-init) weights
    assert any(not torch.equal(start[k], w_single[k]) for k in w_single)  # so the comparison below means something
    for k in w_single:
        # Same math, different summation order (all-reduce): equal to float32 round-off.
        torch.testing.assert_close(w_dist[k], w_single[k], rtol=1e-4, atol=1e-5, msg=k)
    # Only rank 0 wrote: one run.json, no stray temporary folders.
    # The writer lock (retriever/locks.py) stays in the run folder; temp folders must not.
    names = sorted(p.name for p in (tmp_path / "dist").iterdir() if p.name != ".retriever.lock")
    assert names == ["best", "last", "metrics.json", "run.json"]


def _run_or_kill_tree(cmd, env, timeout):
    """Run torchrun; past `timeout` kill it and its workers (which torchrun starts in sessions
    of their own, so a process-group kill misses them) and fail the test."""
    import psutil

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = [proc.pid, *(c.pid for c in psutil.Process(proc.pid).children(recursive=True))]
        for pid in tree:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        proc.wait()
        pytest.fail(f"the two ranks hung: killed after {timeout} s")
    return proc.returncode, out, err


def test_a_rank_whose_whole_batch_failed_to_decode_still_joins_the_step(tiny, tmp_path):
    # Issue 16, item 14: such a rank used to skip the step while the other waited in all_gather
    # (NCCL's 30-minute timeout). Now it brings an empty batch; the run equals one process's.
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    from dataclasses import replace

    from retriever.demo.emoji import emoji_collection, write_manifest
    from retriever.training.data import epoch_samples, rank_batches
    from retriever.training.loop import load_splits

    try:
        items = emoji_collection()[:64]
    except UserError as e:
        pytest.skip(str(e))
    clean = write_manifest(items, tmp_path / "clean.jsonl")
    args = dict(model=tiny.config, augment=False, workers=0, epochs=1, batch_size=16, seed=0, val_fraction=0.25)
    train_items = load_splits(TrainConfig(source=str(clean), out="-", **args)).train
    samples = epoch_samples(train_items, 1, args["seed"])
    rank1_step0 = rank_batches(len(train_items), args["batch_size"], 1, 2)[0]
    bad = {Path(train_items[samples[p].item].path).resolve() for p in rank1_step0}
    (tmp_path / "bad").mkdir()
    broken = []
    for i, it in enumerate(items):
        if Path(it.path).resolve() in bad:
            path = tmp_path / "bad" / f"{i}.png"
            path.write_bytes(b"\x89PNG\r\n\x1a\n not really")
            it = replace(it, path=str(path))
        broken.append(it)
    manifest = write_manifest(broken, tmp_path / "pairs.jsonl")

    single = train(TrainConfig(source=str(manifest), out=str(tmp_path / "single"), **args))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "retriever.cli.app", "train", str(manifest), "--out", str(tmp_path / "dist"), "--model", tiny.config]
    cmd += ["--no-augment", "--workers", "0", "--epochs", "1", "--batch-size", "16", "--seed", "0"]
    cmd += ["--val-fraction", "0.25"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    rc, out, err = _run_or_kill_tree(cmd, env, timeout=240)
    assert len(bad) == 8
    assert rc == 0, out[-3000:] + err[-3000:]
    hist_dist = json.loads((tmp_path / "dist" / "metrics.json").read_text())["history"]
    assert hist_dist[1]["train_loss"] == pytest.approx(single.history[1]["train_loss"], rel=1e-5)
    w_single = load_file(str(tmp_path / "single" / "last" / "open_clip_model.safetensors"))
    w_dist = load_file(str(tmp_path / "dist" / "last" / "open_clip_model.safetensors"))
    for k in w_single:
        torch.testing.assert_close(w_dist[k], w_single[k], rtol=1e-4, atol=1e-5, msg=k)
