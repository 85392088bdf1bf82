"""The hybrid multi-task loss (seeds 000 / 001): L = (1 - lambda) L_MIM + lambda L_CL on one encoder.

A composition, not a copy: an MAE and a MoCo v3 objective built around the same timm encoder. Each
step sees an MAE view (masked branch) and MoCo's two BYOL views of every image. Seed 001 finds that the
two gradients conflict in the higher blocks; `diagnostics` measures the per-block cosine between them.
"""

import torch

from pretrain.data.views import Configured, hybrid_view
from pretrain.methods.base import Objective, config_section, register
from pretrain.methods.grad_conflict import COSINE_TAG, block_gradient_cosines, plot_cosines
from pretrain.methods.mae import MAE
from pretrain.methods.mocov3 import MoCoV3
from pretrain.models import encoder_for


@config_section("hybrid")
class HybridConfig:
    weight: float = 0.5  # lambda in L = (1 - lambda) L_MIM + lambda L_CL

    def checks(self, config):
        return [
            (0 <= self.weight <= 1, "hybrid.weight", "in [0, 1]"),
        ]


@register("hybrid")
class Hybrid(Objective):
    config_sections = ("hybrid", "mae", "moco")
    view = "hybrid"

    def __init__(self, encoder, mae, moco, weight=0.5):
        super().__init__()
        self.encoder = encoder  # registered first, so parameters are named encoder.* (layer ids, export)
        self.mae, self.moco, self.weight = mae, moco, weight

    @classmethod
    def from_config(cls, config):
        encoder = encoder_for(config)
        mae = MAE.from_config(config, encoder)  # initializes the shared encoder, MAE's way
        moco = MoCoV3.from_config(config, encoder)  # copies it into the momentum branch
        hybrid = cls(encoder, mae, moco, weight=config.hybrid.weight)
        hybrid.view = Configured(hybrid_view, config.mae.view, config.moco.view1, config.moco.view2)
        return hybrid

    def losses(self, views):
        masked, first, second = views
        return self.mae(masked), self.moco([first, second])

    def forward(self, views):
        mim, cl = self.losses(views)
        loss = (1 - self.weight) * mim["loss"] + self.weight * cl["loss"]
        return self.regularized(
            {
                "loss": loss,
                "loss_mim": mim["loss"].detach(),
                "loss_cl": cl["loss"].detach(),
                **{k: v for k, v in cl.items() if k != "loss"},
            }
        )

    def diagnostics(self, views):
        """Per-block cosine between the gradients of the MIM and the CL loss (all ranks must call it)."""
        mim, cl = self.losses(views)
        cosines = block_gradient_cosines(mim["loss"], cl["loss"], self.encoder.blocks)
        scalars = {f"{COSINE_TAG}{i:02d}": value for i, value in enumerate(cosines)}
        return scalars, {"grad_cosine_per_block": plot_cosines(cosines)}

    def after_step(self, step, total_steps):
        self.moco.after_step(step, total_steps)

    def on_encoder_loaded(self):
        self.moco.on_encoder_loaded()

    def extra_state(self):
        return self.moco.extra_state()

    def load_extra_state(self, state):
        self.moco.load_extra_state(state)

    @torch.no_grad()
    def images_to_log(self, views):
        return self.mae.images_to_log(views[0])
