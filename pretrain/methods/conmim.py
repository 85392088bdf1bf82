"""ConMIM (Yi et al., 2023): masked image modeling as patch-level denoising contrast.

The online encoder sees the image with random squares masked (mask tokens inside the encoder, as in
SimMIM); a slow (momentum) encoder sees the same crop, unmasked, with strong colour augmentation. Each
image's K patch features from the slow encoder are a dictionary: every masked patch's prediction must
pick its own position among the K keys (InfoNCE over the image's patches, temperature tau). Only the
slow encoder runs without gradient (the seed's pseudocode wraps the online pass in no_grad: a typo).
"""

from dataclasses import field

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.data.views import Configured, ViewConfig, conmim_recipe, conmim_view
from pretrain.methods.base import config_section, register
from pretrain.methods.momentum import MomentumBranch, MomentumObjective
from pretrain.methods.simmim import MaskedPatches, divides_grid
from pretrain.models import enable_block_checkpointing, encoder_for


@config_section("conmim")
class ConMIMConfig:
    mask_ratio: float = 0.75
    mask_patch_size: int = 32  # pixels, as SimMIM
    temperature: float = 0.1  # of the patch-level InfoNCE (our choice: not in the seed notes)
    momentum: float = 0.996  # slow encoder, constant (our choice: not in the seed notes)
    view: ViewConfig = field(default_factory=conmim_recipe)  # crop + flip shared; colour for the slow branch

    def checks(self, config):
        return [
            (0 < self.mask_ratio < 1, "conmim.mask_ratio", "between 0 and 1"),
            (
                config.method != "conmim" or divides_grid(self.mask_patch_size, config),
                "conmim.mask_patch_size",
                f"a multiple of the patch size {config.model.patch} that divides data.img_size",
            ),
            (0 <= self.momentum < 1, "conmim.momentum", "in [0, 1)"),
            (self.temperature > 0, "conmim.temperature", "positive"),
        ]


@register("conmim")
class ConMIM(MaskedPatches, MomentumObjective):
    config_sections = ("conmim",)
    view = "conmim"

    def __init__(
        self,
        encoder,
        mask_ratio=0.75,
        mask_patch_size=32,
        temperature=0.1,
        momentum=0.996,
        grad_checkpointing=False,
    ):
        super().__init__(encoder, mask_ratio, mask_patch_size)
        self.head = nn.Linear(encoder.embed_dim, encoder.embed_dim)
        self.temperature = temperature
        self.target = MomentumBranch({"encoder": encoder}, momentum, cosine=False)
        if grad_checkpointing:
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config):
        c = config.conmim
        conmim = cls(
            encoder_for(config),
            mask_ratio=c.mask_ratio,
            mask_patch_size=c.mask_patch_size,
            temperature=c.temperature,
            momentum=c.momentum,
            grad_checkpointing=config.model.grad_checkpointing,
        )
        conmim.view = Configured(conmim_view, c.view)
        return conmim

    def forward(self, views):
        masked_view, full_view = views
        tokens, mask = self.masked_tokens(masked_view)
        queries = F.normalize(self.head(tokens).float(), dim=-1)
        with self.target.run(full_view, self.training) as target:
            keys = target["encoder"].forward_features(full_view)[:, self.encoder.num_prefix_tokens :]
        keys = F.normalize(keys.float(), dim=-1)
        logits = torch.einsum("bjd,bkd->bjk", queries, keys) / self.temperature  # per image: K x K
        positions = torch.arange(logits.shape[1], device=logits.device).expand(len(logits), -1)
        per_patch = F.cross_entropy(logits.flatten(0, 1), positions.flatten(), reduction="none").view_as(mask)
        loss = (per_patch * mask).sum() / mask.sum().clamp_min(1)
        accuracy = ((logits.argmax(dim=-1) == positions).float() * mask).sum() / mask.sum().clamp_min(1)
        return self.regularized({"loss": loss, "patch_accuracy": accuracy.detach()})
