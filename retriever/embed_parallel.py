"""`retriever embed` on several processes: torchrun ranks or scheduler array tasks as parts.

Under `torchrun --nproc_per_node N` (one or several nodes) every rank is one part of
WORLD_SIZE (see parts.py): rank r writes the shards k with k mod WORLD_SIZE = r, on
`cuda:LOCAL_RANK` when there is a GPU. The process group (gloo on CPU, NCCL on GPU) is used for
one thing only, a barrier at the end, so that rank 0 reports once every part is written; the
work itself needs no communication. Without torchrun the same partition comes from
`--num-parts N --part I` (SLURM_ARRAY_TASK_ID, a loop over machines, ...).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retriever.errors import UserError
from retriever.parts import check_part, parts_status


@dataclass(frozen=True)
class Rank:
    """This process's place in a torchrun job (the library layer does not import training/)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def part_from_environment(num_parts: int, part: int, device: str | None) -> tuple[int, int, str | None, Rank]:
    """(num_parts, part, device, dist info): torchrun's ranks when launched by it, else the flags."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        check_part(part, num_parts)
        return num_parts, part, device, Rank()
    if num_parts != 1 or part != 0:
        raise UserError("Under torchrun the parts are the ranks; drop --num-parts/--part (or run without torchrun).")
    import torch
    import torch.distributed as dist

    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if not dist.is_initialized():
        # Long timeout: ranks meet only at the end, after embedding parts of different sizes.
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(hours=12))
    info = Rank(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(info.local_rank)
    return info.world_size, info.rank, device, info


def finish_parts(out_dir: str | Path, info: Rank) -> dict[str, Any] | None:
    """Wait for every rank (under torchrun), then the folder's part status (None: one-process folder)."""
    if info.enabled:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return parts_status(Path(out_dir).expanduser())
