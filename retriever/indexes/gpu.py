"""FAISS on the GPU when faiss was built with GPU support and sees a device, else the CPU.

What moves: Flat, IVF-Flat, IVF-PQ and IVF-SQ indexes, also inside an OPQ/PCA pre-transform and
under an RFlat re-ranking wrapper (the base index moves; the exact vectors stay in host RAM, as
faiss has no GPU IndexRefine). An IVF index whose coarse quantizer is HNSW moves with that
quantizer left on the CPU (faiss's `allowCpuCoarseQuantizer`). HNSW and on-disk inverted lists
stay on the CPU.

Precision: a Flat index stays float32 on the GPU (exact stays exact), IVF-Flat and IVF-SQ keep
their codes as they are, and IVF-PQ uses float16 lookup tables (the codes are unchanged; faiss
needs float16 tables above 48 sub-quantizers, and they are faster below).

Placement for search copies the index to every GPU, or splits it across them (sharded) when one
GPU cannot hold it; only the GPU-resident part is counted against GPU memory. Building uses one
GPU: the empty index is trained there once and filled, then moved back to the CPU to be saved,
so shards never train their own quantizers.

Ownership: `to_gpu`/`to_cpu` consume their argument. The index they return keeps alive every
object it points to (faiss's `referenced_objects`), so the caller may drop the argument; the
argument itself must not be used afterwards.

No GPU was available where this was written: placement, ownership and the checks below are
tested on the CPU with faiss's clone functions standing in for the GPU ones (tests/fake_gpu.py);
`benchmarks/gpu_check.py` is the check to run on a real GPU.
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
# faiss's GPU k-selection returns at most this many results per query (GPU_MAX_SELECTION_K), and
# GPU IVF indexes probe at most this many lists. Searches that would ask for more are capped by
# the caller (see rerank.search_index).
GPU_MAX_K = 2048
# Share of a GPU's free memory an index may take: faiss also needs scratch space (k-selection,
# query batches, the StandardGpuResources temporary pool of up to 1.5 GiB).
GPU_FILL = 0.8


# pip distributions that install the `faiss` package; two of them overwrite each other's files.
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu-cuvs")
_checked_install = False


def installed_faiss() -> list[str]:
    """The faiss distributions pip has installed here (normally exactly one)."""
    from importlib import metadata

    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def faiss_install_problem() -> str | None:
    """One sentence when more than one faiss distribution is installed, else None."""
    found = installed_faiss()
    if len(found) < 2:
        return None
    names = " ".join(f.split()[0] for f in found)
    return (
        f"{' and '.join(found)} are installed together and overwrite each other's files, so GPU search may "
        f"silently run on the CPU; keep one: pip uninstall -y {names} && pip install faiss-gpu (or faiss-cpu)."
    )


def gpu_count() -> int:
    """GPUs faiss can use (0 without a GPU build of faiss or a usable driver)."""
    global _checked_install
    if not _checked_install:
        _checked_install = True
        problem = faiss_install_problem()
        if problem:
            import logging

            logging.getLogger(__name__).warning(problem)
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
    float16: bool = False  # float16 IVF-PQ lookup tables (the only float16 retriever uses on a GPU)
    shard: bool = False  # split across GPUs instead of one copy per GPU
    cpu_quantizer: bool = False  # the IVF coarse quantizer (HNSW) stays on the CPU
    gpus: int = 1  # how many GPUs the index goes to


def _refine_base(index: faiss.Index) -> faiss.Index:
    index = faiss.downcast_index(index)
    if isinstance(index, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        return faiss.downcast_index(index.base_index)
    return index


def _core(index: faiss.Index) -> faiss.Index:
    """The index that would move: inside a pre-transform and/or a refine wrapper."""
    index = _refine_base(index)
    if isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def gpu_bytes(index: faiss.Index, ntotal: int | None = None) -> int:
    """GPU memory the index's GPU-resident part needs with `ntotal` vectors (default: as it is).

    RFlat's exact vectors and an HNSW coarse quantizer stay in host RAM and are not counted.
    """
    core = _core(index)
    n = int(core.ntotal if ntotal is None else ntotal)
    d = int(core.d)
    if isinstance(core, faiss.IndexFlat):
        return 4 * n * d  # float32: exact stays exact
    if isinstance(core, faiss.IndexIVF):
        quantizer = faiss.downcast_index(core.quantizer)
        fixed = 4 * core.nlist * d if isinstance(quantizer, faiss.IndexFlat) else 0
        per_vector = (4 * d if isinstance(core, faiss.IndexIVFFlat) else int(core.code_size)) + 8
        if isinstance(core, faiss.IndexIVFPQ):
            fixed += 4 * d * (1 << core.pq.nbits)  # the PQ codebooks
        return n * per_vector + fixed
    return 0


def gpu_plan(
    index: faiss.Index,
    n_gpus: int,
    index_bytes: int | None = None,
    gpu_free_bytes: int | None = None,
    *,
    allow_shard: bool = True,
) -> GpuPlan:
    """Whether and how this index can go to `n_gpus` GPUs (pure logic, testable without a GPU).

    index_bytes: GPU memory it needs (default `gpu_bytes(index)`); gpu_free_bytes: the least free
    memory of the GPUs (None: unknown, assume it fits); allow_shard: False to use one GPU only.
    """
    if n_gpus < 1:
        return GpuPlan(False, "faiss sees no GPU")
    core = _core(index)
    if not isinstance(core, _GPU_CAPABLE):
        return GpuPlan(False, f"{type(core).__name__} has no GPU version")
    cpu_quantizer = False
    if isinstance(core, faiss.IndexIVF):
        if isinstance(faiss.downcast_InvertedLists(core.invlists), faiss.OnDiskInvertedLists):
            return GpuPlan(False, "on-disk inverted lists stay on the CPU")
        cpu_quantizer = not isinstance(faiss.downcast_index(core.quantizer), faiss.IndexFlat)
        if core.nprobe > GPU_MAX_K:
            return GpuPlan(False, f"nprobe {core.nprobe} is above the {GPU_MAX_K} lists a GPU index can probe")
    float16 = False
    if isinstance(core, faiss.IndexIVFPQ):
        m, nbits = core.pq.M, core.pq.nbits
        if nbits != 8 or core.code_size not in GPU_PQ_CODE_BYTES:
            return GpuPlan(False, f"GpuIndexIVFPQ has no kernel for PQ{m}x{nbits}")
        float16 = True  # required above GPU_PQ_M_FLOAT32 sub-quantizers, and faster below
    need = gpu_bytes(index) if index_bytes is None else index_bytes
    gpus = n_gpus if allow_shard else 1
    shard = False
    if gpu_free_bytes is not None and need > GPU_FILL * gpu_free_bytes:
        if gpus == 1 or need > GPU_FILL * gpu_free_bytes * gpus:
            return GpuPlan(False, "the index does not fit in GPU memory")
        shard = True
    return GpuPlan(True, float16=float16, shard=shard, cpu_quantizer=cpu_quantizer, gpus=gpus)


def can_use_gpu(index: faiss.Index) -> bool:
    return gpu_plan(index, gpu_count(), index_bytes=0).ok


def _gpu_free_bytes() -> int | None:
    """The least free memory over the GPUs (torch's view), or None when torch cannot tell.

    Asks torch only when faiss sees a GPU, so that CPU-only searches never import torch.
    """
    if gpu_count() == 0:
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return min(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    except Exception:
        pass
    return None


def _cloner_options(plan: GpuPlan):
    """faiss's options for `plan`, setting only fields GpuMultipleClonerOptions has (faiss ≥ 1.8)."""
    co = faiss.GpuMultipleClonerOptions()
    co.useFloat16 = plan.float16  # IVF-PQ: float16 lookup tables; never set for Flat (exact stays exact)
    co.shard = plan.shard
    co.allowCpuCoarseQuantizer = plan.cpu_quantizer
    return co


def _clone_to_gpus(index: faiss.Index, plan: GpuPlan) -> faiss.Index:
    """faiss's GPU clone (a new object that owns itself and its GPU resources)."""
    return faiss.index_cpu_to_gpus_list(index, co=_cloner_options(plan), gpus=list(range(plan.gpus)))


def _owner(index: faiss.Index) -> faiss.Index:
    """The Python object that owns the C++ object behind `index` (itself, or one it references)."""
    if index.this.own():
        return index
    for ref in getattr(index, "referenced_objects", None) or []:
        if isinstance(ref, faiss.Index) and int(ref.this) == int(index.this) and ref.this.own():
            return ref
    return index


def to_gpu(index: faiss.Index, plan: GpuPlan | None = None) -> faiss.Index:
    """The index on the GPU(s) as `plan` says (default: planned here for all GPUs, for search).

    Returns `index` unchanged when the plan says no. An RFlat wrapper keeps its exact vectors on
    the host and its base moves; its host copy of the base is freed. Consumes `index`.
    """
    if plan is None:
        plan = gpu_plan(index, gpu_count(), gpu_free_bytes=_gpu_free_bytes())
    if not plan.ok:
        return index
    outer = faiss.downcast_index(index)
    if not isinstance(outer, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        return _clone_to_gpus(index, plan)
    owner = _owner(index)
    host_base = outer.base_index
    gpu_base = _clone_to_gpus(host_base, plan)
    if outer.own_fields:
        host_base.this.acquire()  # freed with this proxy, now that the wrapper no longer owns it
    outer.base_index = gpu_base
    outer.own_fields = False
    # Python owns the GPU clone; the wrapper's owner and the clone live as long as the result.
    outer.referenced_objects = [owner, gpu_base]
    return outer


def to_cpu(index: faiss.Index) -> faiss.Index:
    """The index back in host RAM (a new object, or `index` itself when it is already there).

    Consumes `index`; what was on the GPU is freed when the caller drops its last reference.
    """
    outer = faiss.downcast_index(index)
    if isinstance(outer, (faiss.IndexRefine, faiss.IndexRefineFlat)):
        if device_name(outer.base_index) != "gpu":
            return index
        owner = _owner(index)
        host_base = faiss.index_gpu_to_cpu(outer.base_index)
        host_base.this.disown()  # handed to the wrapper, which frees it (own_fields)
        outer.base_index = host_base
        outer.own_fields = True
        outer.referenced_objects = [owner]  # drops the GPU clone
        return outer
    return faiss.index_gpu_to_cpu(index) if device_name(index) == "gpu" else index


def device_name(index: faiss.Index) -> str:
    """ "gpu" when the searching part of the index is on a GPU, looking through RFlat and
    pre-transform (OPQ/PCA) wrappers and into shards/replicas; else "cpu"."""
    core = _core(index)
    if isinstance(core, (faiss.IndexShards, faiss.IndexReplicas)):
        return device_name(core.at(0)) if core.count() else "cpu"
    return "gpu" if type(core).__name__.startswith("Gpu") else "cpu"


def max_k(index: faiss.Index) -> int | None:
    """The most results one search of this index can return, where faiss limits it (on a GPU)."""
    return GPU_MAX_K if device_name(index) == "gpu" else None


def gpu_search_params(params: dict) -> dict:
    """The search parameters that can still be set once the index is on a GPU: a CPU coarse
    quantizer's parameters (quantizer_efSearch) must be set before it moves (faiss's
    ParameterSpace cannot reach inside a GpuIndexIVF); the clone keeps them."""
    return {k: v for k, v in params.items() if not k.startswith("quantizer_")}


def gpu_friendly_factory(factory: str) -> str:
    """The factory to build on a GPU: an IVF coarse quantizer searched by HNSW (`IVF65536_HNSW32`)
    cannot be trained or filled on a GPU, so a GPU build uses a flat (brute-force) quantizer,
    which is what a GPU searches fastest anyway."""
    import re

    return re.sub(r"(IVF\d+)_HNSW\d+", r"\1", factory)
