"""Which model produced a set of vectors: recorded with shards and indexes, checked on use.

Kept free of torch so that reading shards and building or searching indexes by vector does not
import it (about 1 GB of RSS and seconds of start-up).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from retriever.errors import ModelMismatchError


@dataclass(frozen=True)
class ModelIdentity:
    """What produced a set of vectors. Stored with shards and indexes.

    Attributes:
        name: how to rebuild the architecture: hub name, `local-dir:PATH` or config-JSON path.
        pretrained: tag, weights-file path, or None (local-dir / random init).
        weights_sha256: content hash of the fp32 state dict: the real identity.
        embed_dim: the vectors' dimension.
    """

    name: str  # how to rebuild the architecture: hub name, `local-dir:PATH` or config-JSON path
    pretrained: str | None  # tag, weights-file path, or None (local-dir / random init)
    weights_sha256: str  # content hash of the fp32 state dict: the real identity
    embed_dim: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        return cls(d["name"], d.get("pretrained"), d["weights_sha256"], int(d["embed_dim"]))

    def label(self) -> str:
        w = self.pretrained or ("its folder's weights" if self.name.startswith("local-dir:") else "random init")
        return f"{self.name} ({w}, sha256 {self.weights_sha256[:12]}, dim {self.embed_dim})"

    def check_same(self, other: ModelIdentity, what: str) -> None:
        """Refuse to mix vectors of two different models."""
        if self.weights_sha256 != other.weights_sha256 or self.embed_dim != other.embed_dim:
            raise ModelMismatchError(
                f"{what} was made with model {other.label()}, "
                f"but the model in use is {self.label()}; use the same model for both."
            )
