"""Supervised fine-tuning of a pretrained encoder: the `finetune` protocol of lg-eval, trained by the
same engine as pretraining (DeepSpeed, checkpoints, resume, Slurm).

The model is timm's VisionTransformer with a head (`pretrain.models.create_classifier`), so the result
is a timm state_dict: `pool: mean` is timm's `global_pool="avg"`, which is MAE's global pool (the mean
of the patch tokens through `fc_norm`, no final `norm`; MAE's models_vit), `pool: token` the class token
after the final norm. The starting weights come through graft.init; the head and `fc_norm` start fresh
(the head at N(0, 2e-5)), and a pretrained `norm` is not used by the global-pool model, as in MAE's
main_finetune. The whole model trains, the position embedding included, with stochastic depth
(model.drop_path) and layer-wise lr decay (optim.layer_decay, applied by pretrain.param_groups like every
other lr rule); the loss is cross-entropy with label smoothing. Augmentation: MAE's crop, flip and
RandAugment, each adjustable (finetune.min_scale, flip, rand_augment: small or symmetric-sensitive
images, such as the demo's digits, need milder ones).
"""
import functools

import torch
import torch.nn.functional as F
from data_prep.manifest import Manifest
from pretrain.errors import UserError
from pretrain.methods.base import Objective
from pretrain.models import create_classifier
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
    fresh_weights = ("head.", "fc_norm.")  # not taken from graft.init: they start at their own init

    def __init__(self, classifier, pool="mean", label_smoothing=0.1, augmentation=None):
        super().__init__()
        self.view = functools.partial(finetune_view, **(augmentation or {}))
        self.encoder, self.pool, self.label_smoothing = classifier, pool, label_smoothing

    @classmethod
    def from_config(cls, config):
        c = config.finetune
        augmentation = dict(min_scale=c.min_scale, flip=c.flip, rand_augment=c.rand_augment)
        m = config.model
        classifier = create_classifier(m.arch, config.data.img_size, m.patch, num_classes_of(config), c.pool,
                                       m.drop_path, m.grad_checkpointing)
        return cls(classifier, c.pool, c.label_smoothing, augmentation)

    def logits(self, images):
        return self.encoder(images)

    def forward(self, images, labels):
        logits = self.logits(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return self.regularized({"loss": loss, "train_top1": accuracy})

    @torch.no_grad()
    def correct(self, images, labels):
        """How many of `images` the classifier gets right (eval mode is the caller's business)."""
        return int((self.logits(images).argmax(dim=1) == labels).sum())
