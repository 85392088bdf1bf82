"""ConMIM (Yi et al., 2023): masked image modeling as patch-level denoising contrast.

The online encoder sees the image with random squares masked (mask tokens inside the encoder, as in
SimMIM); a slow (momentum) encoder sees the same crop, unmasked, with strong colour augmentation. Each
image's K patch features from the slow encoder are a dictionary: every masked patch's prediction must
pick its own position among the K keys (InfoNCE over the image's patches, temperature tau). Only the
slow encoder runs without gradient (the seed's pseudocode wraps the online pass in no_grad: a typo).
"""

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.data.views import Configured, conmim_view
from pretrain.methods.momentum import MomentumBranch, MomentumObjective
from pretrain.methods.simmim import MaskedPatches
from pretrain.models import enable_block_checkpointing, encoder_for


class ConMIM(MaskedPatches, MomentumObjective):
    config_sections = ("conmim",)
    view = "conmim"

    def __init__(
        self,
        encoder,
        mask_ratio=0.75,
        mask_patch=32,
        temperature=0.1,
        momentum=0.996,
        grad_checkpointing=False,
    ):
        super().__init__(encoder, mask_ratio, mask_patch)
        self.head = nn.Linear(encoder.embed_dim, encoder.embed_dim)
        self.temperature = temperature
        self.target = MomentumBranch({"encoder": encoder}, momentum, cosine=False)
        if grad_checkpointing:
            enable_block_checkpointing(encoder.blocks)

    @classmethod
    def from_config(cls, config):
        m, c = config.model, config.conmim
        encoder = encoder_for(config)
        conmim = cls(
            encoder, c.mask_ratio, c.mask_patch_size, c.temperature, c.momentum, m.grad_checkpointing
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
