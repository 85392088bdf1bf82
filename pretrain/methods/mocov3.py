"""MoCo v3 for ViTs (Chen, Xie and He, 2021).

Two augmented views; the online branch (encoder -> projector -> predictor) predicts the momentum
branch's projection of the other view. InfoNCE against the keys of the whole global batch (gathered
from every rank without gradient), temperature tau, scaled by 2 tau, symmetrized over the views. The
momentum encoder follows the online one with a momentum that rises from 0.99 to 1 on a cosine.
Follows facebookresearch/moco-v3's moco/builder.py.

The momentum branch is kept outside the DeepSpeed engine, in float32: inside it, the engine would cast
it to bf16/fp16, where an update of (1 - m) ~ 1e-3 of a weight is below the format's resolution and
is lost, and ZeRO-3 would partition it. Its update reads the online weights under
`deepspeed.zero.GatheredParameters` when ZeRO-3 has partitioned them.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.distributed import all_gather_no_grad, gathered, rank, world_size
from pretrain.methods.base import Objective
from pretrain.models import create_encoder, enable_block_checkpointing, mlp


class MoCoV3(Objective):
    view = "byol"

    def __init__(self, encoder, mlp_dim=4096, out_dim=256, temperature=0.2, momentum=0.99,
                 freeze_patch_embed=True, grad_checkpointing=False):
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(3, encoder.embed_dim, mlp_dim, out_dim)
        self.predictor = mlp(2, out_dim, mlp_dim, out_dim, last_bn=False)
        if torch.cuda.is_available() and world_size() > 1:  # batch statistics over the global batch
            self.projector = nn.SyncBatchNorm.convert_sync_batchnorm(self.projector)
            self.predictor = nn.SyncBatchNorm.convert_sync_batchnorm(self.predictor)
        self.temperature, self.base_momentum, self.momentum = temperature, momentum, momentum
        if freeze_patch_embed:
            encoder.patch_embed.requires_grad_(False)
        branch = nn.ModuleDict({"encoder": encoder, "projector": self.projector})
        object.__setattr__(self, "momentum_branch", copy.deepcopy(branch).requires_grad_(False))  # unregistered
        if grad_checkpointing:  # only the online encoder: the momentum branch runs without gradients
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config):
        m, c = config.model, config.moco
        encoder = create_encoder(m.arch, config.data.img_size, m.patch, m.drop_path)
        return cls(encoder, c.mlp_dim, c.out_dim, c.temperature, c.momentum, c.freeze_patch_embed,
                   m.grad_checkpointing)

    def online_params(self):
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def momentum_params(self):
        return list(self.momentum_branch.parameters())

    @torch.no_grad()
    def keys(self, images):
        """The momentum branch's projections, computed in float32 weights (autocast to the input's dtype)."""
        branch = self.momentum_branch
        if next(branch.parameters()).device != images.device:
            branch.to(images.device)
        branch.train(self.training)
        with torch.autocast(images.device.type, dtype=images.dtype, enabled=images.dtype != torch.float32):
            return branch["projector"](branch["encoder"](images)).float()

    def contrastive_loss(self, queries, keys):
        queries = F.normalize(queries.float(), dim=1)
        keys = F.normalize(all_gather_no_grad(keys), dim=1)
        logits = queries @ keys.T / self.temperature
        labels = torch.arange(len(queries), device=queries.device) + len(queries) * rank()
        positive = logits.gather(1, labels[:, None]).squeeze(1)
        negative_mean = (logits.sum(1) - positive) / (logits.shape[1] - 1)
        loss = F.cross_entropy(logits, labels) * 2 * self.temperature
        return loss, positive.detach().mean(), negative_mean.detach().mean()

    def forward(self, views):
        first, second = views
        q1 = self.predictor(self.projector(self.encoder(first)))
        q2 = self.predictor(self.projector(self.encoder(second)))
        k1, k2 = self.keys(first), self.keys(second)
        loss_12, pos_12, neg_12 = self.contrastive_loss(q1, k2)
        loss_21, pos_21, neg_21 = self.contrastive_loss(q2, k1)
        return self.regularized({"loss": loss_12 + loss_21, "logit_positive": (pos_12 + pos_21) / 2,
                                 "logit_negative": (neg_12 + neg_21) / 2, "momentum": torch.tensor(self.momentum)})

    def on_encoder_loaded(self):
        """Starting weights go into the momentum branch too (as the grafting recipe does)."""
        self.momentum_branch["encoder"].load_state_dict(self.encoder.state_dict())

    @torch.no_grad()
    def after_step(self, step, total_steps):
        """EMA of the online encoder and projector, with MoCo v3's cosine momentum for the next step."""
        self.momentum = 1 - (1 - self.base_momentum) * (1 + math.cos(math.pi * step / total_steps)) / 2
        targets, online = self.momentum_params(), self.online_params()
        with gathered(online):
            if targets[0].device != online[0].device:
                self.momentum_branch.to(online[0].device)
            torch._foreach_mul_(targets, self.momentum)
            torch._foreach_add_(targets, [p.detach().to(t.dtype) for p, t in zip(online, targets)],
                                alpha=1 - self.momentum)

    def extra_state(self):
        return {"momentum_branch": self.momentum_branch.state_dict(), "momentum": self.momentum}

    def load_extra_state(self, state):
        self.momentum_branch.load_state_dict(state["momentum_branch"])
        self.momentum = state["momentum"]
