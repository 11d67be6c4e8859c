"""torch on a GPU, checked on the CPU: pinned batches, the precision and device defaults, TF32.

Issue 16, items 12, 13 and 15 (item 14, every rank in every collective, is in test_distributed.py).
"""

from __future__ import annotations

import torch
from torch.utils.data._utils.pin_memory import pin_memory

from retriever.data.loading import DecodedBatch
from retriever.models.load import resolve_device, resolve_precision


def test_the_loader_pins_a_decoded_batch(monkeypatch):
    # 12: DataLoader(pin_memory=True) passed the dataclass through untouched: nothing was pinned,
    # so non_blocking copies were synchronous.
    pinned = []

    def fake_pin(self, device=None):
        out = self.clone()
        pinned.append(out)
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batch = DecodedBatch([0, 1], torch.zeros(2, 3, 4, 4), [(2, "bad")])
    out = pin_memory(batch)
    assert isinstance(out, DecodedBatch) and out.indices == [0, 1] and out.errors == [(2, "bad")]
    assert len(pinned) == 1 and out.pixels is pinned[0]
    assert pin_memory(DecodedBatch([], None, [(0, "bad")])).pixels is None


def test_bf16_is_the_default_where_the_gpu_has_it(monkeypatch):
    # 13: bf16 on Ampere/Hopper (no loss scaling, no fp16 overflow), fp16 on older GPUs.
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: not including_emulation)
    assert resolve_precision(None, cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert resolve_precision(None, cuda) == "fp16"
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", cuda) == "fp16"


def test_tf32_is_turned_on_for_fp32_matmuls():
    # 13: fp32 matmuls and convolutions on CUDA use TF32 tensor cores once a model is on a GPU.
    from retriever.models.load import enable_tf32

    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    try:
        enable_tf32()
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    finally:
        matmul.fp32_precision, conv.fp32_precision = before


def test_tests_mean_the_cpu_even_where_cuda_is_available(monkeypatch):
    # 15: on a GPU machine the tests picked CUDA + fp16 on their own.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None).type == "cpu"  # conftest: RETRIEVER_DEVICE=cpu
    monkeypatch.delenv("RETRIEVER_DEVICE")
    assert resolve_device(None).type == "cuda"
    assert resolve_device("cpu").type == "cpu"


def test_two_faiss_distributions_are_named_in_one_sentence(monkeypatch, caplog):
    # 11: faiss-cpu and faiss-gpu side by side overwrite each other's files.
    from importlib import metadata

    import retriever.indexes.gpu as gpu

    versions = {"faiss-cpu": "1.15.1", "faiss-gpu": "1.15.1"}

    def version(name):
        if name not in versions:
            raise metadata.PackageNotFoundError(name)
        return versions[name]

    monkeypatch.setattr(metadata, "version", version)
    monkeypatch.setattr(gpu, "_checked_install", False)
    problem = gpu.faiss_install_problem()
    assert problem.count(". ") == 0 and "faiss-cpu 1.15.1 and faiss-gpu 1.15.1" in problem
    assert "pip uninstall -y faiss-cpu faiss-gpu" in problem
    with caplog.at_level("WARNING"):
        gpu.gpu_count()
    assert "overwrite each other's files" in caplog.text
    versions.pop("faiss-gpu")
    assert gpu.faiss_install_problem() is None


def test_the_package_has_no_extra_that_adds_a_second_faiss():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    faiss_deps = [d for d in meta["dependencies"] if d.startswith("faiss")]
    assert faiss_deps == ["faiss-cpu>=1.8"]
    for extra, deps in meta.get("optional-dependencies", {}).items():
        assert not any(d.startswith("faiss") for d in deps), extra
