"""torch.distributed plumbing for training: init from torchrun's env, gather with gradient, reduce grads.

Run `retriever train` under `torchrun --nproc_per_node N`; each process reads RANK, WORLD_SIZE and
LOCAL_RANK from the environment. gloo is used on CPU, NCCL on GPU. Only rank 0 writes files.

Why gradients are averaged by hand instead of wrapping the model in DistributedDataParallel: DDP
reduces gradients through hooks armed by one forward and fired by one backward. GradCache runs
several forwards without grad, a loss backward that touches only the loss parameters, then one
backward per chunk; the cached-feature path never calls the model's forward at all. One
flattened all-reduce after the whole step is exact for all three and costs one collective per
step, which is what DDP does at the end anyway for models this size.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str = "cpu") -> DistInfo:
    """Join the process group torchrun describes in the environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def is_active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def current() -> DistInfo:
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return DistInfo()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows.

    torch.distributed.nn.all_gather does the same but emulates reduce-scatter with all-to-all on
    gloo; an all-reduce of the full gradient followed by taking our rows works on every backend.
    Ranks may hold different row counts (a batch that lost an undecodable image): rows are padded
    to the largest count for the collective and the padding is dropped again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        count_tensors = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(count_tensors, torch.tensor([x.shape[0]], dtype=torch.long, device=x.device))
        counts = [int(c) for c in count_tensors]
        most = max(counts)
        padded = x.new_zeros((most, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.start, ctx.n = sum(counts[:rank]), x.shape[0]
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) so each rank's pairs are negatives for the others.

    Every rank then computes the same global loss L; the backward sums W identical copies of
    dL/dx_local, and `average_gradients` divides by W, which yields exactly dL/dθ.
    """
    if not is_active():
        return x
    return _AllGatherWithGrad.apply(x)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each parameter's gradient over ranks, in one flattened all-reduce."""
    if not is_active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's value on every rank (e.g. a decision only rank 0 can make, like 'best so far')."""
    if not is_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
