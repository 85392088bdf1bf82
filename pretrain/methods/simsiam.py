"""SimSiam (Chen and He, 2021): a predictor regresses the other view's projection, stop-gradient on
the target; no negatives, no momentum encoder. Loss D(p1, z2)/2 + D(p2, z1)/2 with D the negative
cosine: the stop-gradient is what keeps it from collapsing. Follows facebookresearch/simsiam's builder."""

from dataclasses import field

import torch.nn.functional as F

from pretrain.data.views import Configured, ViewConfig, simsiam_recipe, two_views
from pretrain.methods.base import Objective, config_section, register
from pretrain.methods.pair_metrics import pair_metrics
from pretrain.models import enable_block_checkpointing, encoder_for, mlp, sync_batchnorm


@config_section("simsiam")
class SimSiamConfig:
    dim: int = 2048  # projector: 3 layers of dim, BatchNorm after each
    pred_dim: int = 512  # predictor bottleneck
    view: ViewConfig = field(default_factory=simsiam_recipe)  # both views


def negative_cosine(prediction, target):
    return -F.cosine_similarity(prediction.float(), target.detach().float(), dim=-1).mean()


@register("simsiam")
class SimSiam(Objective):
    config_sections = ("simsiam",)
    view = "simsiam"

    def __init__(self, encoder, dim=2048, pred_dim=512, grad_checkpointing=False):
        super().__init__()
        self.encoder = encoder
        self.projector = sync_batchnorm(mlp(3, encoder.embed_dim, dim, dim))
        self.predictor = sync_batchnorm(mlp(2, dim, pred_dim, dim, last_bn=False))
        if grad_checkpointing:
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config):
        c = config.simsiam
        simsiam = cls(
            encoder_for(config),
            dim=c.dim,
            pred_dim=c.pred_dim,
            grad_checkpointing=config.model.grad_checkpointing,
        )
        simsiam.view = Configured(two_views, c.view, c.view)
        return simsiam

    def forward(self, views):
        h1, h2 = (self.encoder(view) for view in views)
        z1, z2 = self.projector(h1), self.projector(h2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        # Collapse shows as the per-dimension std of the normalized output going to 0 (1/sqrt(dim) if
        # healthy).
        spread = F.normalize(z1.detach().float(), dim=1).std(dim=0).mean()
        return self.regularized({"loss": loss, "output_std": spread, **pair_metrics(h1, h2)})
