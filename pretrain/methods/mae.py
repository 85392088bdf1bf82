"""MAE (He et al., 2022): mask 75 % of the patches, encode the visible ones, reconstruct the pixels.

The encoder is a timm ViT run on the visible patches only; the light decoder (timm blocks) sees the
encoded patches plus a shared mask token at every masked position, with fixed 2-D sin-cos positions,
and predicts the pixels of every patch. The loss is the MSE on the masked patches, against per-patch
normalized pixels with `norm_pix_loss`. Follows facebookresearch/mae's models_mae.py.
"""
import torch
from timm.models.vision_transformer import Block
from torch import nn

from pretrain.methods.base import Objective
from pretrain.models import create_encoder, enable_block_checkpointing, patchify, set_sincos_pos_embed, unpatchify
from pretrain.views import IMAGENET_MEAN, IMAGENET_STD


class MAE(Objective):
    view = "mae"

    def __init__(self, encoder, mask_ratio=0.75, decoder_dim=512, decoder_depth=8, decoder_heads=16,
                 norm_pix_loss=True, grad_checkpointing=False):
        super().__init__()
        self.encoder = encoder
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        self.patch_size = encoder.patch_embed.patch_size[0]
        num_patches, embed_dim = encoder.patch_embed.num_patches, encoder.embed_dim

        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[Block(decoder_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True)
                                              for _ in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.patch_size ** 2 * 3)
        self._init_weights()
        if grad_checkpointing:
            enable_block_checkpointing(self.decoder_blocks)

    @classmethod
    def from_config(cls, config):
        m = config.model
        encoder = create_encoder(m.arch, config.data.img_size, m.patch, m.drop_path, m.grad_checkpointing)
        c = config.mae
        return cls(encoder, c.mask_ratio, c.decoder_dim, c.decoder_depth, c.decoder_heads, c.norm_pix_loss,
                   m.grad_checkpointing)

    def _init_weights(self):
        """MAE's initialization: xavier-uniform linears and patch projection, N(0, 0.02) tokens."""
        set_sincos_pos_embed(self.decoder_pos_embed, self.encoder.patch_embed.grid_size)
        weight = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

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
        x = enc.patch_embed(images) + enc.pos_embed[:, enc.num_prefix_tokens:]
        x, mask, ids_restore = self.random_masking(x)
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = enc.blocks(enc.norm_pre(torch.cat([cls, x], dim=1)))
        return enc.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore[..., None].expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]

    def target(self, images):
        target = patchify(images.float(), self.patch_size)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6) ** 0.5
        return target

    def forward(self, images):
        latent, mask, ids_restore = self.forward_encoder(images)
        pred = self.forward_decoder(latent, ids_restore)
        per_patch = ((pred.float() - self.target(images)) ** 2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return self.regularized({"loss": loss})

    @torch.no_grad()
    def images_to_log(self, images, count=4):
        """Input, masked input and reconstruction (visible patches pasted back) of `count` images, in [0, 1]."""
        images = images[:count]
        latent, mask, ids_restore = self.forward_encoder(images)
        pred = self.forward_decoder(latent, ids_restore).float()
        if self.norm_pix_loss:  # undo the per-patch normalization with the input's own statistics
            patches = patchify(images.float(), self.patch_size)
            pred = pred * (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
        mask_pixels = unpatchify(mask[..., None].expand(-1, -1, self.patch_size ** 2 * 3), self.patch_size)
        reconstruction = unpatchify(pred, self.patch_size)
        original = images.float()
        pasted = original * (1 - mask_pixels) + reconstruction * mask_pixels
        rows = torch.cat([original, original * (1 - mask_pixels), pasted])
        mean = torch.tensor(IMAGENET_MEAN, device=rows.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=rows.device).view(1, 3, 1, 1)
        return (rows * std + mean).clamp(0, 1)
