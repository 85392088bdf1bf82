"""Supervised fine-tuning of a pretrained encoder: the `finetune` protocol of lg-eval, trained by the
same engine as pretraining (DeepSpeed, checkpoints, resume, Slurm).

The whole encoder trains, with stochastic depth (model.drop_path) and layer-wise lr decay
(optim.layer_decay, applied by pretrain.param_groups like every other lr rule), under a linear
classifier; the loss is cross-entropy with label smoothing. As MAE's fine-tuning: a mean of the patch
tokens (`pool: mean`, MAE's global pool) through a fresh LayerNorm (`fc_norm`) or the class token
(`pool: token`), and a head initialized at N(0, 2e-5); the position embedding, fixed in pretraining,
trains too. Augmentation: MAE's crop, flip and RandAugment, each adjustable (finetune.min_scale, flip,
rand_augment: small or symmetric-sensitive images, such as the demo's digits, need milder ones). The
starting weights come through graft.init.
"""
import functools

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from data_prep.manifest import Manifest
from pretrain.errors import UserError
from pretrain.methods.base import Objective
from pretrain.models import encoder_for, pool_tokens
from pretrain.views import finetune_view


def num_classes_of(config):
    """finetune.num_classes, or the number of classes the train manifest lists."""
    if config.finetune.num_classes:
        return config.finetune.num_classes
    classes = Manifest.load(config.data.train).classes
    if not classes:
        raise UserError(f"{config.data.train} lists no classes; set finetune.num_classes")
    return len(classes)


class FineTune(Objective):
    uses_labels = True

    def __init__(self, encoder, num_classes, pool="mean", label_smoothing=0.1, augmentation=None):
        super().__init__()
        self.view = functools.partial(finetune_view, **(augmentation or {}))
        self.encoder, self.pool, self.label_smoothing = encoder, pool, label_smoothing
        encoder.pos_embed.requires_grad_(True)  # fixed sin-cos in pretraining; MAE fine-tunes it
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6) if pool == "mean" else nn.Identity()
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_config(cls, config):
        c = config.finetune
        augmentation = dict(min_scale=c.min_scale, flip=c.flip, rand_augment=c.rand_augment)
        return cls(encoder_for(config, config.model.grad_checkpointing), num_classes_of(config), c.pool,
                   c.label_smoothing, augmentation)

    def logits(self, images):
        return self.head(self.fc_norm(pool_tokens(self.encoder, self.encoder.forward_features(images), self.pool)))

    def forward(self, images, labels):
        logits = self.logits(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return self.regularized({"loss": loss, "train_top1": accuracy})

    @torch.no_grad()
    def correct(self, images, labels):
        """How many of `images` the classifier gets right (eval mode is the caller's business)."""
        return int((self.logits(images).argmax(dim=1) == labels).sum())
