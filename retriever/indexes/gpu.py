"""FAISS on the GPU when faiss was built with GPU support and sees a device, else the CPU.

What moves: Flat, IVF-Flat, IVF-PQ and IVF-SQ indexes, also inside an OPQ/PCA pre-transform and
under an RFlat re-ranking wrapper (the base index moves; the exact vectors stay in host RAM, as
faiss has no GPU IndexRefine). HNSW and on-disk inverted lists stay on the CPU. Vectors are stored
as float16 where faiss allows (IVF-Flat/Flat storage, IVF-PQ lookup tables). The index is copied
to every GPU, or split across them (sharded) when one GPU cannot hold it.

No GPU was available where this was written: the decision logic (`gpu_plan`) is unit-tested on
the CPU; the cloning calls follow faiss's documented API but have not been run here.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss

# Index types faiss can move to the GPU; HNSW stays on the CPU.
_GPU_CAPABLE = (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)
# GpuIndexIVFPQ: bytes per code it has kernels for, and the most sub-quantizers whose lookup
# tables fit in 48 KiB of shared memory in float32 (more need float16 tables, up to 96).
GPU_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
GPU_PQ_M_FLOAT32 = 48


def gpu_count() -> int:
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a GPU build on a machine without a usable driver
        return 0


@dataclass(frozen=True)
class GpuPlan:
    ok: bool
    reason: str = ""  # why not, when not ok
    float16: bool = True  # float16 storage / lookup tables
    shard: bool = False  # split across GPUs instead of one copy per GPU


def _core(index: faiss.Index) -> faiss.Index:
    """The index that would move: inside a pre-transform and/or a refine wrapper."""
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        index = faiss.downcast_index(index.base_index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def gpu_plan(index: faiss.Index, n_gpus: int, index_bytes: int = 0, gpu_free_bytes: int | None = None) -> GpuPlan:
    """Whether and how this index can go to `n_gpus` GPUs (pure logic, testable without a GPU)."""
    if n_gpus < 1:
        return GpuPlan(False, "faiss sees no GPU")
    core = _core(index)
    if not isinstance(core, _GPU_CAPABLE):
        return GpuPlan(False, f"{type(core).__name__} has no GPU version")
    if isinstance(core, faiss.IndexIVF) and isinstance(
        faiss.downcast_InvertedLists(core.invlists), faiss.OnDiskInvertedLists
    ):
        return GpuPlan(False, "on-disk inverted lists stay on the CPU")
    float16 = True
    if isinstance(core, faiss.IndexIVFPQ):
        m, nbits = core.pq.M, core.pq.nbits
        if nbits != 8 or core.code_size not in GPU_PQ_CODE_BYTES:
            return GpuPlan(False, f"GpuIndexIVFPQ has no kernel for PQ{m}x{nbits}")
        float16 = True  # required above GPU_PQ_M_FLOAT32 sub-quantizers, and faster below
    shard = False
    if gpu_free_bytes is not None and index_bytes > 0.8 * gpu_free_bytes:
        if n_gpus == 1 or index_bytes > 0.8 * gpu_free_bytes * n_gpus:
            return GpuPlan(False, "the index does not fit in GPU memory")
        shard = True
    return GpuPlan(True, float16=float16, shard=shard)


def can_use_gpu(index: faiss.Index) -> bool:
    return gpu_plan(index, gpu_count()).ok


def _gpu_free_bytes() -> int | None:
    try:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    except Exception:
        pass
    return None


def to_gpu(index: faiss.Index, float16: bool = True, index_bytes: int = 0) -> faiss.Index:
    """Copy (or shard) an index to all GPUs; an RFlat wrapper keeps its exact vectors on the host."""
    n = gpu_count()
    plan = gpu_plan(index, n, index_bytes, _gpu_free_bytes())
    if not plan.ok:
        return index
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = float16 and plan.float16
    co.useFloat16LookupTables = float16 and plan.float16
    co.shard = plan.shard
    outer = faiss.downcast_index(index)
    if isinstance(outer, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        outer.base_index = faiss.index_cpu_to_all_gpus(outer.base_index, co=co)
        outer.own_fields = False  # the GPU copy is owned by Python; keep it alive with the wrapper
        outer._gpu_base = outer.base_index
        return outer
    return faiss.index_cpu_to_all_gpus(index, co=co)


def to_cpu(index: faiss.Index) -> faiss.Index:
    outer = faiss.downcast_index(index)
    if isinstance(outer, (faiss.IndexRefine, faiss.IndexRefineFlat)) and device_name(outer.base_index) == "gpu":
        cpu = faiss.index_gpu_to_cpu(outer.base_index)
        cpu.this.disown()  # handed to the wrapper, which frees it
        outer.base_index = cpu
        outer.own_fields = True
        return outer
    return faiss.index_gpu_to_cpu(index) if device_name(index) == "gpu" else index


def device_name(index: faiss.Index) -> str:
    name = type(index).__name__
    if name in ("IndexRefine", "IndexRefineFlat"):
        return device_name(faiss.downcast_index(index.base_index))
    return "gpu" if "Gpu" in name or "IndexShards" in name or "IndexReplicas" in name else "cpu"
