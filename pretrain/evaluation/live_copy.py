"""A float32 copy of a module that is being trained, for measuring it during the run.

The kNN monitor and the validation monitor measure the live encoder through one of these rather than
the encoder itself: the copy lives outside the engine, in eval mode, so ZeRO's hooks, drop path and the
training's random generators are never touched, and a run with measurements ends with the weights of a
run without them.
"""

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from pretrain.core.distributed import gathered, is_distributed


class LiveCopy:
    def __init__(self, build: Callable[[], nn.Module], device: torch.device):
        # building draws random initial weights: that must not move the training's generator
        with torch.random.fork_rng(devices=[]):
            self.module = build().to(device).float().eval()
        self.module.requires_grad_(False)

    @torch.no_grad()
    def refresh(self, online: nn.Module) -> nn.Module:
        """Load `online`'s current weights (gathered first under ZeRO-3) into the copy and return it.
        `online` may hold more than the copy (a classifier's head when the copy is its encoder); every
        entry of the copy must be in it. Every rank must call it: gathering and the buffer broadcast are
        collectives."""
        with gathered(online.parameters()):
            state = online.state_dict()
            self.module.load_state_dict(
                {name: state[name].detach().float() for name in self.module.state_dict()}
            )
        if is_distributed():
            # Buffers are each rank's own (a BatchNorm's statistics follow that rank's batches; nothing
            # syncs them): every rank measures rank 0's, the ones its checkpoint holds, as DDP would.
            for buffer in self.module.buffers():
                dist.broadcast(buffer, 0)
        return self.module
