"""The crash harness in CI: one random SIGKILL each of embed, index, index --add and train, then resume.

A short N keeps the default suite fast; benchmarks/RESULTS.md keeps a long run's counts
(`python benchmarks/crash_harness.py --kills 50`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_harness.py"


@pytest.mark.e2e  # ~55 CPU-seconds of real CLI processes: in CI, out of the inner loop
def test_killed_commands_resume_to_the_uninterrupted_result(tmp_path):
    spec = importlib.util.spec_from_file_location("crash_harness", HARNESS)
    harness = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = harness  # dataclasses look their module up there
    spec.loader.exec_module(harness)
    result = harness.main(["--kills", "1", "--images", "12", "--json", str(tmp_path / "crash.json")])
    assert set(result) == {"embed", "index", "index --add", "train"}
    for command, r in result.items():
        assert r["identical"] == r["kills"] == 1, (command, r["failures"])
