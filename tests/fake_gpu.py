"""A CPU stand-in for faiss's GPU functions, so the placement and ownership code runs without a GPU.

`FakeGpu(n_gpus, free_bytes).install(monkeypatch)` replaces, on the `faiss` module, the names a
GPU build of faiss adds (StandardGpuResources, get_num_gpus, the cloner options, the clone
functions, GpuParameterSpace) and retriever's view of free GPU memory. A "GPU" index is a
`faiss.clone_index` copy whose proxy class is renamed Gpu<CPU class> (and is found again so by
`faiss.downcast_index`), so type-name checks see it as a GPU index.

What it enforces, as faiss-gpu 1.14–1.15 does (gpu/GpuCloner.cpp, GpuIndexIVFPQ.cu):
- the cloner options have exactly faiss's fields: setting another raises AttributeError;
- only Flat, IVF-Flat, IVF-SQ and IVF-PQ (8-bit codes, supported code sizes, > 48 sub-quantizers
  only with float16 tables) clone; RFlat and HNSW do not; an HNSW coarse quantizer only with
  allowCpuCoarseQuantizer;
- a Flat clone with useFloat16 holds float16-rounded vectors (and so does its copy back);
- a search of a plain GPU index asks for at most 2048 results;
- several GPUs give IndexReplicas or IndexShards of clones; training either trains each copy
  on its own, and copying shards of IVF indexes with different quantizers back fails;
- GpuParameterSpace cannot set a quantizer_ parameter inside a GPU IVF index.
Objects made are logged in `self.log` and kept as weak references in `self.made` (leak checks).
"""

from __future__ import annotations

import weakref

import faiss
import numpy as np

_ORIG_DOWNCAST = faiss.downcast_index
_CAPABLE = (faiss.IndexFlat, faiss.IndexIVFFlat, faiss.IndexIVFPQ, faiss.IndexIVFScalarQuantizer)
_PQ_CODE_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
_MAX_K = 2048


class FakeClonerOptions:
    __slots__ = (
        "indicesOptions",
        "useFloat16CoarseQuantizer",
        "useFloat16",
        "usePrecomputed",
        "reserveVecs",
        "storeTransposed",
        "verbose",
        "use_cuvs",
        "allowCpuCoarseQuantizer",
        "shard",
        "shard_type",
        "common_ivf_quantizer",
    )

    def __init__(self):
        self.indicesOptions, self.reserveVecs, self.shard_type = 3, 0, 1
        self.useFloat16CoarseQuantizer = self.useFloat16 = self.usePrecomputed = False
        self.storeTransposed = self.verbose = self.use_cuvs = self.allowCpuCoarseQuantizer = False
        self.shard = self.common_ivf_quantizer = False


class FakeResources:
    pass


_gpu_classes: dict[type, type] = {}


def _gpu_class(cls: type) -> type:
    if cls not in _gpu_classes:

        def search(self, x, k, *, params=None, D=None, I=None):  # noqa: E741 (faiss's names)
            if k > _MAX_K:
                raise RuntimeError(f"Error: 'k > 0 && k <= GPU_MAX_SELECTION_K' failed: k {k} too large")
            return cls.search(self, x, k, params=params, D=D, I=I)

        _gpu_classes[cls] = type("Gpu" + cls.__name__, (cls,), {"search": search})
    return _gpu_classes[cls]


class FakeGpu:
    def __init__(self, n_gpus: int = 1, free_bytes: int | None = None):
        self.n_gpus = n_gpus
        self.free_bytes = free_bytes
        self.on_gpu: dict[int, weakref.ref] = {}  # C++ address -> weak ref to the Python owner
        self.log: list[dict] = []
        self.made: list[weakref.ref] = []

    def install(self, monkeypatch) -> FakeGpu:
        import retriever.indexes.gpu as gpu_mod

        monkeypatch.setattr(faiss, "StandardGpuResources", FakeResources, raising=False)
        monkeypatch.setattr(faiss, "get_num_gpus", lambda: self.n_gpus)
        monkeypatch.setattr(faiss, "GpuClonerOptions", FakeClonerOptions, raising=False)
        monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", FakeClonerOptions, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpus_list", self.cpu_to_gpus_list, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", self.cpu_to_all_gpus, raising=False)
        monkeypatch.setattr(faiss, "index_cpu_to_gpu", self.cpu_to_gpu, raising=False)
        monkeypatch.setattr(faiss, "index_gpu_to_cpu", self.gpu_to_cpu, raising=False)
        monkeypatch.setattr(faiss, "downcast_index", self.downcast)
        monkeypatch.setattr(faiss, "GpuParameterSpace", self.parameter_space(), raising=False)
        monkeypatch.setattr(gpu_mod, "_gpu_free_bytes", lambda: self.free_bytes)
        return self

    # ---- which objects are "on the GPU"
    def is_gpu(self, index) -> bool:
        ref = self.on_gpu.get(int(index.this))
        return ref is not None and ref() is not None

    def _mark(self, index, owner) -> None:
        self.on_gpu[int(index.this)] = weakref.ref(owner)
        index.__class__ = _gpu_class(type(_ORIG_DOWNCAST(index)))

    def downcast(self, index):
        out = _ORIG_DOWNCAST(index)
        if out is not None and self.is_gpu(out):
            out.__class__ = _gpu_class(type(out))
        return out

    def live(self) -> int:
        """GPU objects still alive (owned by someone in Python)."""
        return sum(r() is not None for r in self.made)

    # ---- cloning
    def _check(self, core, co) -> None:
        if not isinstance(core, _CAPABLE):
            raise RuntimeError(f"This index type is not implemented on GPU: {type(core).__name__}")
        if isinstance(core, faiss.IndexIVF):
            q = _ORIG_DOWNCAST(core.quantizer)
            if not isinstance(q, faiss.IndexFlat) and not co.allowCpuCoarseQuantizer:
                raise RuntimeError(
                    "This index type is not implemented on GPU and allowCpuCoarseQuantizer is set to false."
                )
        if isinstance(core, faiss.IndexIVFPQ):
            if core.pq.nbits != 8 or core.code_size not in _PQ_CODE_BYTES:
                raise RuntimeError(f"GpuIndexIVFPQ: unsupported PQ{core.pq.M}x{core.pq.nbits}")
            if core.pq.M > 48 and not co.useFloat16:
                raise RuntimeError("GPU index only supports up to 48 sub-quantizers with float32 lookup tables")

    def _clone_one(self, index, co):
        outer = _ORIG_DOWNCAST(index)
        if isinstance(outer, (faiss.IndexRefine, faiss.IndexRefineFlat)):
            raise RuntimeError("This index type is not implemented on GPU: IndexRefine")
        pre = isinstance(outer, faiss.IndexPreTransform)
        core = _ORIG_DOWNCAST(outer.index) if pre else outer
        self._check(core, co)
        clone = faiss.clone_index(outer)  # already its own type, and owning (a downcast would not own)
        gpu_core = _ORIG_DOWNCAST(clone.index) if pre else clone
        if isinstance(gpu_core, faiss.IndexFlat) and co.useFloat16 and gpu_core.ntotal:
            xb = faiss.rev_swig_ptr(gpu_core.get_xb(), gpu_core.ntotal * gpu_core.d)
            xb[:] = xb.astype(np.float16).astype(np.float32)
        self._mark(gpu_core, clone)
        if not pre:
            clone = gpu_core
        self.made.append(weakref.ref(clone))
        self.log.append(
            {
                "op": "to_gpu",
                "type": type(core).__name__,
                "trained": bool(core.is_trained),
                "ntotal": int(core.ntotal),
                "shard": bool(co.shard),
                "float16": bool(co.useFloat16),
            }
        )
        return clone

    def cpu_to_gpu(self, res, device, index, co=None):
        return self._clone_one(index, co or FakeClonerOptions())

    def cpu_to_all_gpus(self, index, co=None, ngpu=-1):
        return self.cpu_to_gpus_list(index, co=co, gpus=None, ngpu=ngpu)

    def cpu_to_gpus_list(self, index, co=None, gpus=None, ngpu=-1):
        co = co or FakeClonerOptions()
        n = len(gpus) if gpus is not None else (self.n_gpus if ngpu == -1 else ngpu)
        if n == 1:
            return self._clone_one(index, co)
        core = _ORIG_DOWNCAST(index)
        if isinstance(core, faiss.IndexPreTransform):
            raise NotImplementedError("the fake shards/replicates plain indexes only")
        if not co.shard:
            out = faiss.IndexReplicas(core.d, False)
            for _ in range(n):
                out.addIndex(self._clone_one(core, co))
        else:
            flat = isinstance(core, faiss.IndexFlat)
            out = faiss.IndexShards(core.d, False, flat)  # faiss: successive ids for Flat shards only
            bounds = np.linspace(0, core.ntotal, n + 1).astype(np.int64)
            for lo, hi in zip(bounds, bounds[1:]):
                part = self._clone_one(core, co)
                if core.ntotal:
                    part.remove_ids(faiss.IDSelectorNot(faiss.IDSelectorRange(int(lo), int(hi))))
                out.add_shard(part)
        self.made.append(weakref.ref(out))
        return out

    def gpu_to_cpu(self, index):
        outer = _ORIG_DOWNCAST(index)
        self.log.append({"op": "to_cpu", "type": type(outer).__name__})
        if isinstance(outer, faiss.IndexReplicas):
            return self.gpu_to_cpu(outer.at(0))
        if isinstance(outer, faiss.IndexShards):
            parts = [_ORIG_DOWNCAST(outer.at(i)) for i in range(outer.count())]
            if isinstance(parts[0], faiss.IndexIVF):
                ref = faiss.vector_to_array(_ORIG_DOWNCAST(parts[0].quantizer).codes)
                for p in parts[1:]:
                    if not np.array_equal(faiss.vector_to_array(_ORIG_DOWNCAST(p.quantizer).codes), ref):
                        raise RuntimeError("merge_from: the shards' coarse quantizers differ")
                merged = faiss.clone_index(parts[0])
                for p in parts[1:]:
                    merged.merge_from(faiss.clone_index(p), 0)
                return merged
            merged = faiss.clone_index(parts[0])
            for p in parts[1:]:
                merged.add(p.reconstruct_n(0, p.ntotal))
            return merged
        return faiss.clone_index(outer)

    def parameter_space(self):
        fake = self

        class FakeGpuParameterSpace(faiss.ParameterSpace):
            def set_index_parameter(self, index, name, value):
                inner = _ORIG_DOWNCAST(index)
                while isinstance(inner, (faiss.IndexRefine, faiss.IndexRefineFlat, faiss.IndexPreTransform)):
                    if isinstance(inner, faiss.IndexPreTransform):
                        inner = _ORIG_DOWNCAST(inner.index)
                    elif name == "k_factor_rf":
                        break
                    else:
                        inner = _ORIG_DOWNCAST(inner.base_index)
                if name.startswith("quantizer_") and fake.is_gpu(inner):
                    raise RuntimeError(f"could not set parameter {name} on a GPU IVF index")
                return faiss.ParameterSpace.set_index_parameter(self, index, name, value)

            def set_index_parameters(self, index, desc):
                for part in str(desc).split(","):
                    name, value = part.split("=")
                    self.set_index_parameter(index, name, float(value))

        return FakeGpuParameterSpace
