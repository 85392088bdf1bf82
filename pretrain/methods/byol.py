"""BYOL (Grill et al., 2020): the online branch (encoder, projector, predictor) regresses the
momentum target's projection of the other view with a normalized MSE; no negatives. The target
(encoder + projector) is an EMA whose momentum rises from 0.996 to 1 on a cosine."""

import torch

from pretrain.data.views import Configured, two_views
from pretrain.methods.momentum import MomentumBranch, MomentumObjective, cosine_regression
from pretrain.methods.pair_metrics import pair_metrics
from pretrain.models import enable_block_checkpointing, encoder_for, mlp, sync_batchnorm


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
        m, c = config.model, config.byol
        encoder = encoder_for(config)
        byol = cls(encoder, c.mlp_dim, c.out_dim, c.momentum, m.grad_checkpointing)
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
