"""CLIP-like synthetic vectors and shards, for benchmarks and tests of the index layer.

Real CLIP embeddings are anisotropic (they share a common direction), clustered by topic and of
low intrinsic dimension. We draw cluster centres in an r-dimensional latent space, points around
them, map the latent space into d dimensions with a fixed random matrix, add a shared offset and
a little isotropic noise, and L2-normalise.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from retriever.identity import ModelIdentity
from retriever.shards import shard_name, shard_schema, write_shard


@dataclass(frozen=True)
class ClipLike:
    dim: int = 512
    latent: int = 32  # intrinsic dimension
    clusters: int = 1000
    spread: float = 0.6  # within-cluster std relative to the centres' (1.0)
    noise: float = 0.1  # isotropic noise per unit vector, relative
    seed: int = 0

    def _basis(self):
        rng = np.random.default_rng(self.seed)
        centres = rng.standard_normal((self.clusters, self.latent)).astype(np.float32)
        proj = (rng.standard_normal((self.latent, self.dim)) / np.sqrt(self.latent)).astype(np.float32)
        offset = rng.standard_normal(self.dim).astype(np.float32)
        offset *= 1.2 / np.linalg.norm(offset)  # the shared direction: random pairs have cosine ≈ 0.6
        return centres, proj, offset

    def sample(self, n: int, stream: int = 0) -> np.ndarray:
        """n unit vectors; a different `stream` gives different points from the same clusters."""
        centres, proj, offset = self._basis()
        rng = np.random.default_rng([self.seed, stream + 1])
        labels = rng.integers(0, self.clusters, n)
        z = centres[labels] + self.spread * rng.standard_normal((n, self.latent), dtype=np.float32)
        x = z @ proj
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        x += offset + (self.noise / np.sqrt(self.dim)) * rng.standard_normal((n, self.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32)

    def identity(self) -> ModelIdentity:
        """A model identity for synthetic vectors: the hash names the generator's settings."""
        tag = f"synthetic-clip-like {self.dim} {self.latent} {self.clusters} {self.spread} {self.noise} {self.seed}"
        return ModelIdentity("synthetic-clip-like", None, hashlib.sha256(tag.encode()).hexdigest(), self.dim)


def write_synthetic_shards(
    folder: str | Path,
    gen: ClipLike,
    n: int,
    *,
    shard_rows: int = 100_000,
    first_id: int = 0,
    stream: int = 0,
    captions_every: int = 0,
    identity: ModelIdentity | None = None,
) -> Path:
    """Write n generated rows as shards part-00000… (ids first_id…); every `captions_every`-th row
    gets a caption and a text vector (0: none). Each row has a metadata column `bucket` = id mod
    1000, so `bucket < 50` selects 5% of the rows, spread over every cluster. `identity`: the model
    the shards claim (default: the generator's own). Returns the folder."""
    folder = Path(folder)
    schema = shard_schema(identity or gen.identity(), metadata_fields=[pa.field("bucket", pa.int64())])
    for s, lo in enumerate(range(0, n, shard_rows)):
        m = min(shard_rows, n - lo)
        img = gen.sample(m, stream=stream * 1_000_003 + s)
        ids = np.arange(first_id + lo, first_id + lo + m)
        has_text = (ids % captions_every == 0) if captions_every else np.zeros(m, bool)
        txt = np.where(has_text[:, None], img, 0).astype(np.float32)
        captions = [f"caption {i}" if t else None for i, t in zip(ids, has_text)]
        write_shard(
            folder / shard_name(s),
            schema,
            ids.tolist(),
            [f"img/{i}.jpg" for i in ids],
            captions,
            img,
            txt,
            has_text,
            [{"bucket": int(i) % 1000} for i in ids],
        )
    return folder
