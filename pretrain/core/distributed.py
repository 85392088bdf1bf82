"""Process-group setup and the few collective helpers the methods need."""

import contextlib
import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank0_value(value):
    """Rank 0's `value` (any picklable object) on every rank: how a problem only rank 0 can see (a lock
    held, a full disk) stops every rank alike. A collective when distributed."""
    values = [value]
    if is_distributed():
        dist.broadcast_object_list(values, src=0)
    return values[0]


def set_collective_timeout(seconds):
    """Make every collective, in every process group made from now on, give up on a silent peer after
    `seconds`; returns the timedelta to pass to the process group's initialization too.

    DeepSpeed creates its ZeRO groups with torch.distributed.new_group(ranks), which takes torch's
    default timeout (30 min for gloo, 10 for NCCL) rather than the one the world group got; torch reads
    that default from these module globals whenever a group is made. tests/test_failures.py checks
    that a stopped peer is noticed in time, so a torch that moves them shows up there.
    """
    timeout = timedelta(seconds=seconds)
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = timeout
    if hasattr(c10d, "default_pg_nccl_timeout"):
        c10d.default_pg_nccl_timeout = timeout
    return timeout


def default_env_for_single_process():
    """Let a plain `python -m pretrain.train` run as a world of one (launchers set these themselves)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


@torch.no_grad()
def all_gather_no_grad(tensor):
    """Concatenate `tensor` from every rank along dim 0; no gradient flows through the result."""
    if not is_distributed() or world_size() == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered)


def gathered(params):
    """Context in which ZeRO-3-partitioned `params` hold their full values (read-only); a no-op for
    parameters DeepSpeed did not partition. Every rank must enter it (it is a collective)."""
    params = list(params)
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered tensor over ranks and keeps this
    rank's slice: the exact gradient of a loss that every rank computes on the whole gathered batch.
    (torch.distributed.nn's all_gather needs reduce_scatter, which gloo lacks; all_reduce it has.)"""

    @staticmethod
    def forward(ctx, tensor):
        ctx.size = len(tensor)
        parts = [torch.empty_like(tensor) for _ in range(world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[rank() * ctx.size : (rank() + 1) * ctx.size]


def all_gather_with_grad(tensor):
    """Concatenate `tensor` from every rank along dim 0, with gradients flowing back to each rank's part."""
    if not is_distributed() or world_size() == 1:
        return tensor
    return _AllGather.apply(tensor)
