"""MoCo v3 for ViTs (Chen, Xie and He, 2021).

Two augmented views; the online branch (encoder -> projector -> predictor) predicts the momentum
branch's projection of the other view. InfoNCE against the keys of the whole global batch (gathered
from every rank without gradient), temperature tau, scaled by 2 tau, symmetrized over the views. The
momentum encoder follows the online one with a momentum that rises from 0.99 to 1 on a cosine.
Follows facebookresearch/moco-v3's moco/builder.py.
"""

from dataclasses import field

import torch

from pretrain.data.views import Configured, ViewConfig, byol_recipe, two_views
from pretrain.methods.base import config_section, register
from pretrain.methods.momentum import MomentumBranch, MomentumObjective, info_nce
from pretrain.methods.pair_metrics import pair_metrics
from pretrain.models import enable_block_checkpointing, encoder_for, mlp, sync_batchnorm


@config_section("moco")
class MoCoConfig:
    temperature: float = 0.2
    mlp_dim: int = 4096
    out_dim: int = 256
    momentum: float = 0.99  # start of the cosine schedule to 1
    freeze_patch_embed: bool = True  # MoCo v3's stability trick: a fixed random patch projection
    view1: ViewConfig = field(default_factory=byol_recipe)  # BYOL's asymmetric pair (also hybrid's)
    view2: ViewConfig = field(default_factory=lambda: byol_recipe(second=True))

    def checks(self, config):
        return [
            (0 <= self.momentum < 1, "moco.momentum", "in [0, 1)"),
            (self.temperature > 0, "moco.temperature", "positive"),
            (self.mlp_dim > 0, "moco.mlp_dim", "positive"),
            (self.out_dim > 0, "moco.out_dim", "positive"),
        ]


@register("mocov3")
class MoCoV3(MomentumObjective):
    config_sections = ("moco",)
    view = "byol"
    decay_exempt = "none"  # main_moco.py: AdamW(model.parameters(), weight_decay=0.1) decays everything

    def __init__(
        self,
        encoder,
        mlp_dim=4096,
        out_dim=256,
        temperature=0.2,
        momentum=0.99,
        freeze_patch_embed=True,
        grad_checkpointing=False,
    ):
        super().__init__()
        self.encoder = encoder
        self.projector = sync_batchnorm(mlp(3, encoder.embed_dim, mlp_dim, out_dim))
        # Both end in a BatchNorm without affine parameters: moco-v3's MoCo_ViT builds its predictor with
        # _build_mlp's default last_bn=True (only the ResNet predictor passes False).
        self.predictor = sync_batchnorm(mlp(2, out_dim, mlp_dim, out_dim))
        self.temperature = temperature
        if freeze_patch_embed:
            encoder.patch_embed.requires_grad_(False)
        self.target = MomentumBranch({"encoder": encoder, "projector": self.projector}, momentum)
        if grad_checkpointing:  # only the online encoder: the momentum branch runs without gradients
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config, encoder=None):
        """MoCo v3 of `config.moco`, around a new encoder or a shared one (hybrid)."""
        c = config.moco
        moco = cls(
            encoder or encoder_for(config),
            mlp_dim=c.mlp_dim,
            out_dim=c.out_dim,
            temperature=c.temperature,
            momentum=c.momentum,
            freeze_patch_embed=c.freeze_patch_embed,
            grad_checkpointing=config.model.grad_checkpointing,
        )
        moco.view = Configured(two_views, c.view1, c.view2)
        return moco

    def keys(self, images):
        with self.target.run(images, self.training) as target:
            return target["projector"](target["encoder"](images)).float()

    def forward(self, views):
        first, second = views
        h1, h2 = self.encoder(first), self.encoder(second)
        q1, q2 = self.predictor(self.projector(h1)), self.predictor(self.projector(h2))
        k1, k2 = self.keys(first), self.keys(second)
        loss_12, pos_12, neg_12 = info_nce(q1, k2, self.temperature)
        loss_21, pos_21, neg_21 = info_nce(q2, k1, self.temperature)
        return self.regularized(
            {
                "loss": (loss_12 + loss_21) * 2 * self.temperature,
                "logit_positive": (pos_12 + pos_21) / 2,
                "logit_negative": (neg_12 + neg_21) / 2,
                "momentum": torch.tensor(self.target.momentum),
                **pair_metrics(h1, h2),
            }
        )
