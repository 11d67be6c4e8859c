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

import torch
import torch.distributed as dist

from retriever.embed_parallel import Rank

# This process's place in the torchrun job: the library's type (embedding in parts uses it too).
DistInfo = Rank


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
    Ranks may hold different row counts (a batch that lost an undecodable image, or all of them):
    rows are padded to the largest count for the collective and the padding is dropped again.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        # (rows, width) of every rank: a rank with no rows passes a (0, 0) tensor, not knowing
        # the width, and takes it from the others.
        shapes = [torch.zeros(2, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(shapes, torch.tensor([x.shape[0], x.shape[1]], dtype=torch.long, device=x.device))
        counts = [int(s[0]) for s in shapes]
        width = max(int(s[1]) for s in shapes)
        most = max(counts)
        padded = x.new_zeros((most, width))
        padded[: x.shape[0], : x.shape[1]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.start, ctx.n, ctx.width = sum(counts[:rank]), x.shape[0], x.shape[1]
        return torch.cat([p[:c] for p, c in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.n, : ctx.width]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's rows (rank order) so each rank's pairs are negatives for the others.

    Every rank then computes the same global loss L; the backward sums W identical copies of
    dL/dx_local, and `average_gradients` divides by W, which yields exactly dL/dθ.
    """
    if not is_active():
        return x
    return _AllGatherWithGrad.apply(x)


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each parameter's gradient over ranks, in one flattened all-reduce.

    Every rank reduces the same tensor, whichever gradients it has: a rank whose batch had no
    rows contributes zeros (its share of the global loss's gradient), and a parameter without a
    gradient on every rank keeps none. A trailing count per parameter says which ranks had one.
    """
    if not is_active():
        return
    if not params:
        return
    ref = params[0]
    parts = [p.grad.reshape(-1) if p.grad is not None else ref.new_zeros(p.numel()) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
    flat = torch.cat([*[t.to(ref.dtype) for t in parts], present])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    counts = flat[-len(params) :]
    offset = 0
    for p, had in zip(params, counts.tolist()):
        n = p.numel()
        if had > 0:
            avg = flat[offset : offset + n].view_as(p)
            if p.grad is None:
                p.grad = avg.to(p.dtype).clone()
            else:
                p.grad.copy_(avg)
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
