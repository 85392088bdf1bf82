"""MAE (He et al., 2022): mask 75 % of the patches, encode the visible ones, reconstruct the pixels.

The encoder is a timm ViT run on the visible patches only; the light decoder (timm blocks) sees the
encoded patches plus a shared mask token at every masked position, with fixed 2-D sin-cos positions,
and predicts the pixels of every patch. The loss is the MSE on the masked patches, against per-patch
normalized pixels with `norm_pix_loss`. Follows facebookresearch/mae's models_mae.py.
"""

from dataclasses import field

import torch
from timm.models.vision_transformer import Block
from torch import nn

from pretrain.data.views import IMAGENET_MEAN, IMAGENET_STD, Configured, ViewConfig, mae_recipe, single_view
from pretrain.methods.base import Objective, config_section, register
from pretrain.models import (
    enable_block_checkpointing,
    encoder_for,
    patchify,
    set_sincos_pos_embed,
    unpatchify,
    use_encoder_tokens,
)


@config_section("mae")
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True
    view: ViewConfig = field(default_factory=mae_recipe)  # also the masked view of hybrid

    def checks(self, config):
        return [
            (0 < self.mask_ratio < 1, "mae.mask_ratio", "between 0 and 1"),
            (self.decoder_dim > 0, "mae.decoder_dim", "positive"),
            (self.decoder_heads > 0, "mae.decoder_heads", "positive"),
        ]


def init_mae_weights(method):
    """MAE's initialization: xavier-uniform linears and patch projection, N(0, 0.02) class token."""
    weight = method.encoder.patch_embed.proj.weight.data
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    nn.init.normal_(method.encoder.cls_token, std=0.02)
    for module in method.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MAEDecoder(nn.Module):
    """MAE's light decoder: the encoded visible tokens, a shared mask token at every masked position
    and fixed 2-D sin-cos positions through timm blocks, then a linear prediction for every patch."""

    def __init__(self, grid_size, embed_dim, dim=512, depth=8, heads=16, out_dim=768):
        super().__init__()
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, grid_size[0] * grid_size[1] + 1, dim), requires_grad=False
        )
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, out_dim)
        set_sincos_pos_embed(self.pos_embed, grid_size)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, x, ids_restore):
        """(N, 1 + visible, embed_dim) encoder tokens -> (N, num_patches, out_dim) in image order."""
        x = self.embed(x)
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        return self.pred(self.norm(self.blocks(x)))[:, 1:]


@register("mae")
class MAE(Objective):
    config_sections = ("mae",)
    view = "mae"
    decay_exempt = "1d"  # main_pretrain.py: timm's add_weight_decay spares 1-D parameters only (tokens decay)

    def __init__(
        self,
        encoder,
        mask_ratio=0.75,
        decoder_dim=512,
        decoder_depth=8,
        decoder_heads=16,
        norm_pix_loss=True,
        grad_checkpointing=False,
    ):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        self.decoder = MAEDecoder(
            encoder.patch_embed.grid_size,
            encoder.embed_dim,
            decoder_dim,
            decoder_depth,
            decoder_heads,
            self.patch_size**2 * 3,
        )
        init_mae_weights(self)
        use_encoder_tokens(self, encoder)
        if grad_checkpointing:
            enable_block_checkpointing(self.decoder.blocks)

    @classmethod
    def from_config(cls, config, encoder=None):
        """MAE of `config.mae`, around a new encoder, or around `encoder` when a composite method shares
        one (hybrid, CMAE: MAE initializes it its way; their other parts add block checkpointing)."""
        c, checkpointing = config.mae, config.model.grad_checkpointing
        mae = cls(
            encoder or encoder_for(config, checkpointing),
            mask_ratio=c.mask_ratio,
            decoder_dim=c.decoder_dim,
            decoder_depth=c.decoder_depth,
            decoder_heads=c.decoder_heads,
            norm_pix_loss=c.norm_pix_loss,
            grad_checkpointing=checkpointing,
        )
        mae.view = Configured(single_view, c.view)
        return mae

    def random_masking(self, x):
        """Keep a random (1 - mask_ratio) of the tokens of each sample (per-sample shuffle by noise).
        Returns the kept tokens, the mask (1 = removed, in the original order) and the unshuffle index."""
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(n, length, device=x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        kept = torch.gather(x, 1, ids_shuffle[:, :keep, None].expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :keep] = 0
        return kept, torch.gather(mask, 1, ids_restore), ids_restore

    def forward_encoder(self, images):
        enc = self.encoder
        x = enc.patch_embed(images) + enc.pos_embed[:, enc.num_prefix_tokens :]
        x, mask, ids_restore = self.random_masking(x)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(enc.norm_pre(torch.cat([cls, x], dim=1)))
        return enc.norm(x), mask, ids_restore

    def target(self, images):
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward(self, images, visualize=False):
        """The loss; or, with `visualize`, the reconstruction grid of `images_to_log` (computed inside
        forward so that ZeRO-3 gathers the parameters it reads)."""
        latent, mask, ids_restore = self.forward_encoder(images)
        pred = self.decoder(latent, ids_restore)
        if visualize:
            return self.reconstruction_grid(images, pred.float(), mask)
        return self.regularized({"loss": self.reconstruction_loss(images, pred, mask)})

    def reconstruction_loss(self, images, pred, mask):
        """Mean squared error of the predicted pixels, over the masked patches only."""
        per_patch = ((pred.float() - self.target(images)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    @torch.no_grad()
    def images_to_log(self, images, count=4):
        """Input, masked input and reconstruction (visible patches pasted back) of `count` images, in [0,
        1]."""
        return self(images[:count], visualize=True)

    def reconstruction_grid(self, images, pred, mask):
        if self.norm_pix_loss:  # undo the per-patch normalization with the input's own statistics
            patches = patchify(images.float(), self.patch_size)
            pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(
                dim=-1, keepdim=True
            )
        mask_pixels = unpatchify(mask[..., None].expand(-1, -1, self.patch_size**2 * 3), self.patch_size)
        reconstruction = unpatchify(pred, self.patch_size)
        original = images.float()
        pasted = original * (1 - mask_pixels) + reconstruction * mask_pixels
        rows = torch.cat([original, original * (1 - mask_pixels), pasted])
        mean = torch.tensor(IMAGENET_MEAN, device=rows.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=rows.device).view(1, 3, 1, 1)
        return (rows * std + mean).clamp(0, 1)
