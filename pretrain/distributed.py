"""Process-group setup and the few collective helpers the methods need."""
import contextlib
import os
import socket

import torch
import torch.distributed as dist


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def default_env_for_single_process():
    """Let a plain `python -m pretrain.train` run as a world of one (launchers set these themselves)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


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
