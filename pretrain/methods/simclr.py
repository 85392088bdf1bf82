"""SimCLR (Chen et al., 2020): NT-Xent over the 2N views of the global batch.

Both views go through the encoder and a projector; each projection's positive is the other view of
its image, its negatives the other 2N - 2 views of the whole global batch. The projections are
gathered from every rank *with* gradient (`all_gather_with_grad`), so every view is a negative for
every other with its gradient, as in a single-process batch of the global size.
"""

from dataclasses import field

import torch
import torch.nn.functional as F

from pretrain.core.distributed import all_gather_with_grad, rank
from pretrain.data.views import Configured, ViewConfig, simclr_recipe, two_views
from pretrain.methods.base import Objective, config_section, register
from pretrain.methods.pair_metrics import pair_metrics
from pretrain.models import enable_block_checkpointing, encoder_for, mlp, sync_batchnorm


@config_section("simclr")
class SimCLRConfig:
    temperature: float = 0.1
    mlp_dim: int = 2048  # projector: encoder -> mlp_dim -> out_dim, BatchNorm between
    out_dim: int = 128
    view: ViewConfig = field(default_factory=simclr_recipe)  # both views

    def checks(self, config):
        return [
            (self.temperature > 0, "simclr.temperature", "positive"),
        ]


@register("simclr")
class SimCLR(Objective):
    config_sections = ("simclr",)
    view = "simclr"

    def __init__(self, encoder, mlp_dim=2048, out_dim=128, temperature=0.1, grad_checkpointing=False):
        super().__init__()
        self.encoder = encoder
        self.projector = sync_batchnorm(mlp(2, encoder.embed_dim, mlp_dim, out_dim, last_bn=False))
        self.temperature = temperature
        if grad_checkpointing:
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config):
        c = config.simclr
        simclr = cls(
            encoder_for(config),
            mlp_dim=c.mlp_dim,
            out_dim=c.out_dim,
            temperature=c.temperature,
            grad_checkpointing=config.model.grad_checkpointing,
        )
        simclr.view = Configured(two_views, c.view, c.view)
        return simclr

    def forward(self, views):
        first, second = views
        local = len(first)
        h = [self.encoder(view) for view in views]
        z = [F.normalize(self.projector(features).float(), dim=1) for features in h]
        z1, z2 = all_gather_with_grad(z[0]), all_gather_with_grad(z[1])
        everything = torch.cat([z1, z2])  # (2M, d): the first views of the global batch, then the second
        total = len(z1)
        anchors = torch.cat([z[0], z[1]])  # this rank's 2N views
        logits = anchors @ everything.T / self.temperature
        mine = torch.arange(local, device=logits.device) + rank() * local
        own = torch.cat([mine, mine + total])  # each anchor's own column, excluded
        positive = torch.cat([mine + total, mine])  # the other view of the same image
        logits = logits.masked_fill(F.one_hot(own, len(everything)).bool(), float("-inf"))
        loss = F.cross_entropy(logits, positive)
        accuracy = (logits.argmax(dim=1) == positive).float().mean()
        return self.regularized({"loss": loss, "contrast_accuracy": accuracy.detach(), **pair_metrics(*h)})
