"""`retriever embed` on several processes: torchrun ranks or scheduler array tasks as parts.

Under `torchrun --nproc_per_node N` (one or several nodes) every rank is one part of
WORLD_SIZE (see parts.py): rank r writes the shards k with k mod WORLD_SIZE = r, on
`cuda:LOCAL_RANK` when there is a GPU. The process group (gloo on CPU, NCCL on GPU) is used for
one thing only, a barrier at the end, so that rank 0 reports once every part is written; the
work itself needs no communication. Without torchrun the same partition comes from
`--num-parts N --part I` (SLURM_ARRAY_TASK_ID, a loop over machines, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from retriever.errors import UserError
from retriever.parts import check_part, parts_status
from retriever.training.distributed import DistInfo, barrier, init_distributed


def part_from_environment(num_parts: int, part: int, device: str | None) -> tuple[int, int, str | None, DistInfo]:
    """(num_parts, part, device, dist info): torchrun's ranks when launched by it, else the flags."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        check_part(part, num_parts)
        return num_parts, part, device, DistInfo()
    if num_parts != 1 or part != 0:
        raise UserError("Under torchrun the parts are the ranks; drop --num-parts/--part (or run without torchrun).")
    import torch

    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    info = init_distributed("cuda" if use_cuda else "cpu")
    if use_cuda:
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(info.local_rank)
    return info.world_size, info.rank, device, info


def finish_parts(out_dir: str | Path, info: DistInfo) -> dict[str, Any] | None:
    """Wait for every rank (under torchrun), then the folder's part status (None: one-process folder)."""
    if info.enabled:
        import torch.distributed as dist

        barrier()
        dist.destroy_process_group()
    return parts_status(Path(out_dir).expanduser())
