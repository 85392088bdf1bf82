"""BYOL (Grill et al., 2020): the online branch (encoder, projector, predictor) regresses the
momentum target's projection of the other view with a normalized MSE; no negatives. The target
(encoder + projector) is an EMA whose momentum rises from 0.996 to 1 on a cosine."""

from dataclasses import field

import torch

from pretrain.data.views import Configured, ViewConfig, byol_recipe, two_views
from pretrain.methods.base import config_section, register
from pretrain.methods.momentum import MomentumBranch, MomentumObjective, cosine_regression
from pretrain.methods.pair_metrics import pair_metrics
from pretrain.models import enable_block_checkpointing, encoder_for, mlp, sync_batchnorm


@config_section("byol")
class BYOLConfig:
    mlp_dim: int = 4096  # projector and predictor: 2 layers, mlp_dim hidden
    out_dim: int = 256
    momentum: float = 0.996  # start of the cosine schedule to 1
    view1: ViewConfig = field(default_factory=byol_recipe)
    view2: ViewConfig = field(default_factory=lambda: byol_recipe(second=True))

    def checks(self, config):
        return [
            (0 <= self.momentum < 1, "byol.momentum", "in [0, 1)"),
        ]


@register("byol")
class BYOL(MomentumObjective):
    config_sections = ("byol",)
    view = "byol"

    def __init__(self, encoder, mlp_dim=4096, out_dim=256, momentum=0.996, grad_checkpointing=False):
        super().__init__()
        self.encoder = encoder
        self.projector = sync_batchnorm(mlp(2, encoder.embed_dim, mlp_dim, out_dim, last_bn=False))
        self.predictor = sync_batchnorm(mlp(2, out_dim, mlp_dim, out_dim, last_bn=False))
        self.target = MomentumBranch({"encoder": encoder, "projector": self.projector}, momentum)
        if grad_checkpointing:
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config):
        c = config.byol
        byol = cls(
            encoder_for(config),
            mlp_dim=c.mlp_dim,
            out_dim=c.out_dim,
            momentum=c.momentum,
            grad_checkpointing=config.model.grad_checkpointing,
        )
        byol.view = Configured(two_views, c.view1, c.view2)
        return byol

    def forward(self, views):
        first, second = views
        h1, h2 = self.encoder(first), self.encoder(second)
        p1, p2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        with self.target.run(first, self.training) as target:
            z1, z2 = (target["projector"](target["encoder"](view)) for view in views)
        loss = cosine_regression(p1, z2) + cosine_regression(p2, z1)
        return self.regularized(
            {"loss": loss, "momentum": torch.tensor(self.target.momentum), **pair_metrics(h1, h2)}
        )
