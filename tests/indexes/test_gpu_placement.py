"""The GPU placement code, run on the CPU: faiss's clone functions stand in for the GPU ones.

tests/fake_gpu.py enforces what faiss-gpu 1.14–1.15 enforces (cloner option fields, clonable
index types, 6-bit PQ, HNSW quantizers, top-k ≤ 2048, shards training their own quantizers).
Numbers in comments refer to issue 16's list of predicted GPU failures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from fake_gpu import FakeGpu

from retriever.errors import UserError
from retriever.indexes import BuildConfig, build_index, gpu
from retriever.indexes.synthetic import ClipLike, write_synthetic_shards
from retriever.indexes.tune import recall_at_k
from retriever.search import Retriever

D = 16
GEN = ClipLike(dim=D, latent=8, clusters=40, seed=3)
N = 10_000  # enough training vectors for 8-bit PQ codes (pq_shape), which the GPU needs


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """Small indexes: OpenMP threads only spin against each other on a busy CI machine."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_synthetic_shards(tmp_path_factory.mktemp("gpu") / "s", GEN, N, shard_rows=5000)


@pytest.fixture(scope="module")
def xb():
    return GEN.sample(N, stream=5)


def _trained(factory: str, xb: np.ndarray) -> faiss.Index:
    from retriever.indexes.build import new_index
    from retriever.indexes.choose import IndexSpec

    index = new_index(IndexSpec(factory), D)  # OPQ with few iterations, as builds use
    index.train(xb[:4000])
    index.add(xb)
    return index


@pytest.mark.parametrize(
    "factory", ["IVF64,PQ4x8np,RFlat", "OPQ4_16,IVF64,PQ4x8np,RFlat", "IVF64,Flat", "Flat", "OPQ4_16,IVF64,PQ4x8np"]
)
def test_to_gpu_and_back_keeps_results(monkeypatch, xb, factory):
    # 1: RFlat wrappers used to fail on an attribute faiss refuses; 4: OPQ read as "cpu".
    FakeGpu(1).install(monkeypatch)
    index = _trained(factory, xb)
    q = xb[:50]
    d0, i0 = index.search(q, 10)
    on_gpu = gpu.to_gpu(index)
    assert gpu.device_name(on_gpu) == "gpu"
    d1, i1 = on_gpu.search(q, 10)
    back = gpu.to_cpu(on_gpu)
    assert gpu.device_name(back) == "cpu"
    d2, i2 = back.search(q, 10)
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(i0, i2)
    np.testing.assert_allclose(d0, d2, rtol=1e-6)


_OWNERSHIP_SCRIPT = """
import gc, sys
import faiss, numpy as np, pytest
from fake_gpu import FakeGpu
from retriever.indexes import gpu
faiss.omp_set_num_threads(1)
mp = pytest.MonkeyPatch()
fake = FakeGpu(1).install(mp)
xb = np.random.default_rng(0).standard_normal((3000, 16)).astype("float32")
for factory in sys.argv[2:]:
    index = faiss.index_factory(16, factory, faiss.METRIC_INNER_PRODUCT)
    index.train(xb)
    index.add(xb)
    want = index.search(xb[:20], 5)[1]
    on_gpu = gpu.to_gpu(index)
    del index
    gc.collect()
    assert (on_gpu.search(xb[:20], 5)[1] == want).all(), factory
    back = gpu.to_cpu(on_gpu)
    del on_gpu
    gc.collect()
    assert fake.live() == 0, "a GPU copy outlived its index: " + factory
    faiss.write_index(back, sys.argv[1])
    del back
    assert (faiss.read_index(sys.argv[1]).search(xb[:20], 5)[1] == want).all(), factory
    print("ok", factory)
"""


def test_callers_may_drop_what_they_passed(tmp_path):
    # 2: to_gpu/to_cpu returned a proxy that did not own the index while the caller dropped the
    # owner: use after free (a segfault in write_index), so this runs in its own process. Also
    # checks that no GPU copy outlives the index it belonged to.
    factories = ["IVF16,PQ4x8np,RFlat", "OPQ4_16,IVF16,PQ4x8np", "IVF16,Flat"]
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run(
        [sys.executable, "-c", _OWNERSHIP_SCRIPT, str(tmp_path / "x.faiss"), *factories],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-2000:]}"
    assert proc.stdout.split() == [w for f in factories for w in ("ok", f)]


def test_hnsw_quantizer_moves_with_a_cpu_quantizer(monkeypatch, xb):
    # 3: an IVF index whose coarse quantizer is HNSW (auto above 2M vectors) cannot be cloned
    # unless the quantizer may stay on the CPU.
    FakeGpu(1).install(monkeypatch)
    index = _trained("OPQ4_16,IVF64_HNSW32,PQ4x8np", xb)
    plan = gpu.gpu_plan(index, 1)
    assert plan.ok and plan.cpu_quantizer
    want = index.search(xb[:30], 10)[1]
    on_gpu = gpu.to_gpu(index)
    assert gpu.device_name(on_gpu) == "gpu"
    np.testing.assert_array_equal(on_gpu.search(xb[:30], 10)[1], want)


def test_gpu_build_uses_a_gpu_clonable_quantizer(monkeypatch, shards, tmp_path):
    # 3: building "opq" on a GPU uses a flat coarse quantizer, which the GPU can train and fill.
    fake = FakeGpu(1).install(monkeypatch)
    m = build_index(shards, tmp_path / "i", BuildConfig(index_type="opq", use_gpu=True), modalities=("image",))
    entry = m.indexes["image"]
    assert "_HNSW" not in entry.factory and entry.built_on == "gpu"
    assert "quantizer_efSearch" not in entry.search_params
    assert any(e["op"] == "to_gpu" for e in fake.log)
    Retriever(tmp_path / "i", use_gpu=True).search_raw(GEN.sample(5, stream=8), 10, "image")


def test_pretransform_on_gpu_takes_search_parameters_and_saves(monkeypatch, xb, tmp_path):
    # 4: device_name must look inside IndexPreTransform (nprobe through the GPU parameter
    # space; moved back before write_index).
    FakeGpu(1).install(monkeypatch)
    index = gpu.to_gpu(_trained("OPQ4_16,IVF64_HNSW32,PQ4x8np", xb))
    assert gpu.device_name(index) == "gpu"
    from retriever.indexes.build import set_search_params

    set_search_params(index, {"nprobe": 7, "quantizer_efSearch": 80})  # the latter was set before moving
    assert faiss.extract_index_ivf(gpu.to_cpu(index)).nprobe == 7
    back = gpu.to_cpu(gpu.to_gpu(_trained("OPQ4_16,IVF64,PQ4x8np", xb)))
    faiss.write_index(back, str(tmp_path / "x.faiss"))
    assert "Gpu" not in type(faiss.downcast_index(faiss.read_index(str(tmp_path / "x.faiss")).index)).__name__


def test_gpu_k_above_2048_is_refused_and_candidates_are_capped(monkeypatch, shards, tmp_path):
    # 5: GPU top-k is at most 2048: k is refused with a sentence; re-ranking candidates capped.
    build_index(shards, tmp_path / "flat", BuildConfig(index_type="flat"), modalities=("image",))
    build_index(
        shards, tmp_path / "mm", BuildConfig(index_type="ivfpq", max_memory=None, on_disk=False), modalities=("image",)
    )
    FakeGpu(1).install(monkeypatch)
    r = Retriever(tmp_path / "flat", use_gpu=True)
    q = GEN.sample(3, stream=9)
    with pytest.raises(UserError, match="2048"):
        r.search_raw(q, 3000, "image")
    assert r.search_raw(q, 2048, "image")[1].shape == (3, 2048)
    # RFlat with k_factor_rf 32 and k=100 would ask the GPU base for 3200 candidates.
    from retriever.indexes.rerank import capped_refine_factor

    assert capped_refine_factor(100, 32.0, 2048) * 100 <= 2048
    assert capped_refine_factor(100, 4.0, 2048) == 4.0
    assert capped_refine_factor(10, 4.0, None) == 4.0
    rflat = Retriever(tmp_path / "mm", use_gpu=True)
    set_k = rflat._index("image")
    faiss.ParameterSpace().set_index_parameter(set_k, "k_factor_rf", 32)
    s, rows = rflat.search_raw(q, 100, "image")
    assert rows.shape == (3, 100) and (rows >= 0).all()


def test_mmap_rerank_candidates_are_capped_on_a_gpu(monkeypatch, xb, tmp_path):
    # 5: re-ranking from disk asks the base index for k × rerank_k_factor candidates.
    from retriever.indexes.rerank import VectorStore, VectorWriter, search_index

    writer = VectorWriter(tmp_path / "v.npy", N, D)
    writer.write(xb)
    writer.close()
    store = VectorStore([tmp_path / "v.npy"])
    FakeGpu(1).install(monkeypatch)
    index = gpu.to_gpu(_trained("IVF64,PQ4x8np", xb))
    q = xb[:5]
    s, rows = search_index(index, q, 10, {"rerank_k_factor": 300}, store, max_k=gpu.max_k(index))
    store.close()
    np.testing.assert_array_equal(rows[:, 0], np.arange(5))  # each query finds itself, exactly scored
    np.testing.assert_allclose(s[:, 0], (q * q).sum(1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "flat"])
def test_multi_gpu_build_trains_once_then_shards_for_search(monkeypatch, shards, tmp_path, kind):
    # 6: the empty index was sharded before training (each shard its own quantizer; merging back
    # failed; a sharded Flat refused its second add).
    cpu = build_index(shards, tmp_path / "cpu", BuildConfig(index_type=kind, use_gpu=False), modalities=("image",))
    size = cpu.indexes["image"].extra["estimated_memory_bytes"]
    fake = FakeGpu(2, free_bytes=int(0.9 * size)).install(monkeypatch)  # fits on two GPUs, not on one
    build_index(shards, tmp_path / "gpu", BuildConfig(index_type=kind), modalities=("image",))
    for event in fake.log:
        assert not (event["op"] == "to_gpu" and event["shard"] and not event["ntotal"]), fake.log
    q = GEN.sample(40, stream=11)
    r_gpu = Retriever(tmp_path / "gpu")
    s_gpu, i_gpu = r_gpu.search_raw(q, 10, "image")
    assert isinstance(faiss.downcast_index(r_gpu._index("image")), faiss.IndexShards)  # too big for one GPU
    s_cpu, i_cpu = Retriever(tmp_path / "cpu", use_gpu=False).search_raw(q, 10, "image")
    assert recall_at_k(i_gpu, i_cpu, 10) >= 0.95
    np.testing.assert_allclose(s_gpu[:, 0], s_cpu[:, 0], atol=1e-5)


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "opq"])
def test_gpu_search_agrees_with_cpu_on_a_stand_in_gpu(monkeypatch, shards, tmp_path, kind):
    # 7: the real-GPU version of this test used 6-bit PQ codes the GPU rejects. 8: an exact
    # (Flat) index stays exact on the GPU: float32 storage, identical scores.
    FakeGpu(1).install(monkeypatch)
    _gpu_search_agrees_with_cpu(shards, tmp_path, kind, stand_in=True)


@pytest.mark.skipif(not gpu.gpu_count(), reason="faiss sees no GPU")
@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq", "opq"])
def test_gpu_search_agrees_with_cpu_on_a_real_gpu(shards, tmp_path, kind):
    _gpu_search_agrees_with_cpu(shards, tmp_path, kind, stand_in=False)


def _gpu_search_agrees_with_cpu(shards, tmp_path, kind, stand_in):
    build_index(shards, tmp_path / kind, BuildConfig(index_type=kind, use_gpu=kind != "flat"), modalities=("image",))
    q = GEN.sample(50, stream=31)
    r_gpu = Retriever(tmp_path / kind, use_gpu=True)
    s_gpu, i_gpu = r_gpu.search_raw(q, 10, "image")
    assert gpu.device_name(r_gpu._index("image")) == "gpu"
    s_cpu, i_cpu = Retriever(tmp_path / kind, use_gpu=False).search_raw(q, 10, "image")
    if kind == "flat":  # float32 on the GPU: the same scores up to summation order
        np.testing.assert_allclose(s_gpu, s_cpu, rtol=1e-5, atol=1e-6)
        assert np.array_equal(i_gpu, i_cpu) if stand_in else recall_at_k(i_gpu, i_cpu, 10) >= 0.99
    else:
        assert recall_at_k(i_gpu, i_cpu, 10) >= 0.95, kind
        np.testing.assert_allclose(s_gpu[:, 0], s_cpu[:, 0], atol=2e-3)


def test_flat_placed_on_gpu_keeps_float32_vectors(monkeypatch, xb):
    # 8: useFloat16 on a Flat clone rounds the stored vectors; it must not be asked for.
    FakeGpu(1).install(monkeypatch)
    back = gpu.to_cpu(gpu.to_gpu(_trained("Flat", xb)))
    np.testing.assert_array_equal(back.reconstruct_n(0, 100), xb[:100])


def test_built_on_says_where_it_was_built(monkeypatch, shards, tmp_path):
    # 10: built_on was "gpu" even when the index silently stayed on the CPU (here: too big).
    FakeGpu(1, free_bytes=1000).install(monkeypatch)
    m = build_index(shards, tmp_path / "i", BuildConfig(index_type="ivf"), modalities=("image",))
    assert m.indexes["image"].built_on == "cpu"
    assert json.loads((tmp_path / "i" / "manifest.json").read_text())["indexes"]["image"]["built_on"] == "cpu"


def test_rflat_host_vectors_do_not_count_as_gpu_memory(monkeypatch, shards, tmp_path):
    # 10: RFlat's exact vectors stay in host RAM; only the PQ part needs GPU memory.
    m = build_index(shards, tmp_path / "i", BuildConfig(index_type="ivfpq", use_gpu=False), modalities=("image",))
    entry = m.indexes["image"]
    assert entry.factory.endswith(",RFlat")
    whole = entry.extra["estimated_memory_bytes"]  # includes the 4·N·D bytes of exact vectors
    FakeGpu(1, free_bytes=whole // 2).install(monkeypatch)
    r = Retriever(tmp_path / "i")
    r.search_raw(GEN.sample(3, stream=4), 10, "image")
    assert gpu.device_name(r._index("image")) == "gpu"
    assert gpu.gpu_bytes(r._index("image")) < whole // 2


def test_cloner_options_are_faiss_fields_only(monkeypatch):
    # 9: useFloat16LookupTables is not a cloner field (a silent no-op on real faiss).
    FakeGpu(1).install(monkeypatch)
    co = gpu._cloner_options(gpu.GpuPlan(True, float16=True, cpu_quantizer=True))
    assert co.useFloat16 and co.allowCpuCoarseQuantizer and not co.shard
    with pytest.raises(AttributeError):
        co.useFloat16LookupTables = True
