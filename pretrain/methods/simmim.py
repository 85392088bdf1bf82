"""SimMIM (Xie et al., 2022): masked image modeling with the mask token *inside* the encoder.

Random squares of `mask_patch_size` pixels (32 at 224 px) are masked (ratio 0.6); the encoder sees every
position, a learned mask token in place of each masked patch embedding; one linear layer predicts the
pixels of every patch (SimMIM's 1x1 convolution + pixel shuffle at the patch stride); L1 loss on the
masked pixels. Follows microsoft/SimMIM's simmim.py.
"""

from dataclasses import field

import torch
from torch import nn

from pretrain.data.views import Configured, ViewConfig, simmim_recipe, single_view
from pretrain.methods.base import Objective, config_section, register
from pretrain.models import (
    block_mask,
    enable_block_checkpointing,
    encode_with_mask_tokens,
    encoder_for,
    patchify,
    use_encoder_tokens,
)


def divides_grid(mask_patch, config):
    """Masked squares of `mask_patch` pixels tile the image in whole patches."""
    return mask_patch > 0 and mask_patch % config.model.patch == 0 and config.data.img_size % mask_patch == 0


@config_section("simmim")
class SimMIMConfig:
    mask_ratio: float = 0.6
    mask_patch_size: int = 32  # pixels; masked squares are this size (a multiple of the patch size)
    view: ViewConfig = field(default_factory=simmim_recipe)

    def checks(self, config):
        return [
            (0 < self.mask_ratio < 1, "simmim.mask_ratio", "between 0 and 1"),
            (
                config.method != "simmim" or divides_grid(self.mask_patch_size, config),
                "simmim.mask_patch_size",
                f"a multiple of the patch size {config.model.patch} that divides data.img_size",
            ),
        ]


class MaskedPatches(Objective):
    """The part SimMIM and ConMIM share: the mask and the encoder pass with mask tokens."""

    def __init__(self, encoder, mask_ratio, mask_patch_size):
        super().__init__()
        self.encoder = encoder
        self.patch_size = encoder.patch_embed.patch_size[0]
        if mask_patch_size % self.patch_size:
            raise ValueError(
                f"mask_patch_size {mask_patch_size} must be a multiple of the patch size {self.patch_size}"
            )
        self.mask_ratio, self.mask_patch = mask_ratio, mask_patch_size // self.patch_size  # in tokens
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        use_encoder_tokens(self, encoder)

    def masked_tokens(self, images):
        """The encoder's patch tokens (class token dropped) for `images` with random squares masked, and
        the mask."""
        mask = block_mask(
            len(images), self.encoder.patch_embed.grid_size, self.mask_patch, self.mask_ratio, images.device
        )
        tokens = encode_with_mask_tokens(self.encoder, images, mask, self.mask_token)
        return tokens[:, self.encoder.num_prefix_tokens :], mask


@register("simmim")
class SimMIM(MaskedPatches):
    config_sections = ("simmim",)
    view = "simmim"

    def __init__(self, encoder, mask_ratio=0.6, mask_patch_size=32, grad_checkpointing=False):
        super().__init__(encoder, mask_ratio, mask_patch_size)
        self.head = nn.Linear(encoder.embed_dim, self.patch_size**2 * 3)
        if grad_checkpointing:
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config):
        c = config.simmim
        simmim = cls(
            encoder_for(config),
            mask_ratio=c.mask_ratio,
            mask_patch_size=c.mask_patch_size,
            grad_checkpointing=config.model.grad_checkpointing,
        )
        simmim.view = Configured(single_view, c.view)
        return simmim

    def forward(self, images):
        tokens, mask = self.masked_tokens(images)
        error = (self.head(tokens).float() - patchify(images.float(), self.patch_size)).abs().mean(dim=-1)
        loss = (error * mask).sum() / mask.sum().clamp_min(1)
        return self.regularized({"loss": loss})
