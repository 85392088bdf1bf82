"""The momentum (EMA) branch of MoCo v3, BYOL, CMAE and ConMIM, and the losses those methods share.

The branch is kept outside the DeepSpeed engine, in float32: inside it, the engine would cast it to
bf16/fp16, where an update of (1 - m) ~ 1e-3 of a weight is below the format's resolution and is lost,
and ZeRO-3 would partition it. Its update reads the online weights under
`deepspeed.zero.GatheredParameters` when ZeRO-3 has partitioned them.
"""

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.core.distributed import all_gather_no_grad, gathered, rank
from pretrain.methods.base import Objective


class MomentumBranch:
    """An EMA copy of some of a method's online modules (a plain object: not registered, so neither
    the engine nor the optimizer sees it). `cosine`: the momentum rises from `base_momentum` to 1 on a
    half cosine over training (MoCo v3, BYOL); otherwise it stays constant (CMAE, ConMIM)."""

    def __init__(self, modules, base_momentum, cosine=True):
        if any("forward" in vars(module) for online in modules.values() for module in online.modules()):
            raise ValueError(
                "create the momentum branch before enabling block checkpointing (a copy would "
                "keep calling the online blocks)"
            )
        self.online = dict(modules)
        self.branch = copy.deepcopy(nn.ModuleDict(modules)).requires_grad_(False)
        self.base_momentum = self.momentum = base_momentum
        self.cosine = cosine

    @contextlib.contextmanager
    def run(self, images, training):
        """`with branch.run(images, self.training) as target:` -> the ModuleDict, without gradients, in
        float32 weights autocast to the input's dtype, on the input's device."""
        if next(self.branch.parameters()).device != images.device:
            self.branch.to(images.device)
        self.branch.train(training)
        with (
            torch.no_grad(),
            torch.autocast(images.device.type, dtype=images.dtype, enabled=images.dtype != torch.float32),
        ):
            yield self.branch

    @torch.no_grad()
    def update(self, step, total_steps):
        """target = m * target + (1 - m) * online, then the momentum for the next step."""
        if self.cosine:
            self.momentum = 1 - (1 - self.base_momentum) * (1 + math.cos(math.pi * step / total_steps)) / 2
        targets = [p for name in self.online for p in self.branch[name].parameters()]
        online = [p for module in self.online.values() for p in module.parameters()]
        with gathered(online):
            if targets[0].device != online[0].device:
                self.branch.to(online[0].device)
            torch._foreach_mul_(targets, self.momentum)
            torch._foreach_add_(
                targets, [p.detach().to(t.dtype) for p, t in zip(online, targets)], alpha=1 - self.momentum
            )

    def copy_online(self, name):
        """Start `name` over from the online weights (grafting loaded new ones into them)."""
        self.branch[name].load_state_dict(self.online[name].state_dict())

    def state_dict(self):
        return {"momentum_branch": self.branch.state_dict(), "momentum": self.momentum}

    def load_state_dict(self, state):
        self.branch.load_state_dict(state["momentum_branch"])
        self.momentum = state["momentum"]


class MomentumObjective(Objective):
    """An objective with a `self.target` MomentumBranch that holds an `encoder`."""

    def after_step(self, step, total_steps):
        self.target.update(step, total_steps)

    def on_encoder_loaded(self):
        """Starting weights go into the momentum encoder too (as the grafting recipe does)."""
        self.target.copy_online("encoder")

    def extra_state(self):
        return self.target.state_dict()

    def load_extra_state(self, state):
        self.target.load_state_dict(state)


def info_nce(queries, keys, temperature):
    """InfoNCE of each local query against the keys of the whole global batch (gathered without
    gradient); the positive of query i is key i of this rank. Returns the loss and the mean positive
    and negative logits."""
    queries = F.normalize(queries.float(), dim=1)
    keys = F.normalize(all_gather_no_grad(keys.float()), dim=1)
    logits = queries @ keys.T / temperature
    labels = torch.arange(len(queries), device=queries.device) + len(queries) * rank()
    positive = logits.gather(1, labels[:, None]).squeeze(1)
    negative_mean = (logits.sum(1) - positive) / max(1, logits.shape[1] - 1)
    return F.cross_entropy(logits, labels), positive.detach().mean(), negative_mean.detach().mean()


def cosine_regression(prediction, target):
    """BYOL's normalized MSE, 2 - 2 cos(p, z), with the target detached; mean over the batch."""
    return 2 - 2 * F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1).mean()
