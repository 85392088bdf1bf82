"""Linear probing on a frozen encoder, as the papers measure it (lg-eval linear --protocol mae|mocov3),
trained by the pretraining engine like fine-tuning (DeepSpeed, checkpoints, exact resume, Slurm).

The model is the fine-tuning classifier (timm's VisionTransformer with a head, pretrain.models), with
every parameter but the head frozen and the frozen part kept in eval mode (MoCo v3's main_lincls: "it
is not legitimate to change any part of the pre-trained model"), so its weights and statistics stay
bit for bit those of graft.init; the run's result checks that they did (`frozen_unchanged`).

* protocol mae (MAE's main_linprobe.py): BatchNorm1d without affine parameters (eps 1e-6) before the
  linear layer, the layer at N(0, 0.01) truncated; LARS (optim.optimizer=lars) in its configs.
  With pool mean the features are the mean patch token through a fresh, frozen fc_norm, as MAE's
  global-pool model gets one that the pretrained checkpoint does not hold.
* protocol mocov3 (MoCo v3's main_lincls.py): the linear layer alone at N(0, 0.01); SGD in its configs.

Loss: plain cross-entropy (both scripts). The view is a random resized crop and a flip (finetune.min_scale,
flip, interpolation); RandAugment, mixing and erasing belong to fine-tuning and are not applied. On CUDA
the frozen encoder runs under bf16 autocast (MAE's linear probe runs under AMP); the head in fp32.
The result, classifier.pth, is a plain timm state_dict: the BatchNorm (in eval mode an affine map) is
folded into the LayerNorm before the head (`classifier_state`).
"""

import functools

import timm
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.data.views import finetune_view
from pretrain.methods.base import Objective, config_section, register
from pretrain.methods.finetune import classifier_args_of
from pretrain.models import create_classifier

PROTOCOLS = ("mae", "mocov3")  # whose head: main_linprobe.py's or main_lincls.py's


@config_section("linprobe")
class LinprobeConfig:
    """Linear probing on a frozen encoder (method: linprobe); its data, val and pool are the `finetune`
    section's. `protocol` names whose head: mae (main_linprobe.py: BatchNorm without affine, then the
    linear layer) or mocov3 (main_lincls.py: the linear layer alone). The optimizer is optim.optimizer."""

    protocol: str = "mae"

    def checks(self, config):
        return [
            (self.protocol in PROTOCOLS, "linprobe.protocol", f"one of {', '.join(PROTOCOLS)}"),
        ]


@register("linprobe")
class LinearProbe(Objective):
    config_sections = ("linprobe", "finetune")
    uses_labels = True
    scored_on_val = True
    decay_exempt = "none"  # both recipes: weight decay 0 on the head
    fresh_weights = ("head.", "fc_norm.")

    def __init__(self, classifier_args, protocol="mae", augmentation=None):
        super().__init__()
        self.view = functools.partial(finetune_view, **{**(augmentation or {}), "rand_augment": ""})
        self.protocol, self.classifier_args = protocol, classifier_args
        self.encoder = self.make_classifier()
        for name, param in self.encoder.named_parameters():
            param.requires_grad_(name.startswith("head."))

    @staticmethod
    def with_probe_head(classifier, protocol):
        """`classifier` with the protocol's head (initialized as the protocol does)."""
        linear = classifier.head
        if protocol == "mae":
            timm.layers.trunc_normal_(linear.weight, std=0.01)
            classifier.head = nn.Sequential(
                nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear
            )
        else:
            nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        return classifier

    @classmethod
    def from_config(cls, config):
        c = config.finetune  # a probe's data, val, pool and augmentation are fine-tuning's settings
        classifier_args = classifier_args_of(config)
        augmentation = dict(min_scale=c.min_scale, flip=c.flip, interpolation=c.interpolation)
        return cls(classifier_args, protocol=config.linprobe.protocol, augmentation=augmentation)

    def make_classifier(self):
        """A new module of this probe's structure (the model, and copies that measure its weights)."""
        return self.with_probe_head(create_classifier(**self.classifier_args), self.protocol)

    def train(self, mode=True):
        """Only the head follows the engine's train/eval switch; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        self.encoder.head.train(mode)
        return self

    def features(self, images):
        model = self.encoder
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=images.is_cuda):
            return model.forward_head(model.forward_features(images), pre_logits=True).float()

    def logits(self, images):
        return self.encoder.head(self.features(images))

    def forward(self, images, labels):
        logits = self.logits(images)
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return {"loss": loss, "train_top1": accuracy}

    @staticmethod
    def classifier_state(state):
        """The timm state_dict of a probe's state (keys of `encoder`). The protocol-mae BatchNorm (in eval
        mode the affine map (f - mean) / sqrt(var + eps)) is folded into the LayerNorm that makes the
        features, the final `norm` (class token) or `fc_norm` (mean pool): gamma' = gamma / s,
        beta' = (beta - mean) / s. Folded into the linear layer instead, the mean would be subtracted
        after the multiplication, and float32 loses the difference for features of small spread."""
        if "head.1.weight" not in state:
            return dict(state)
        norm = "fc_norm" if "fc_norm.weight" in state else "norm"
        folded = {k: v for k, v in state.items() if not k.startswith("head.")}
        mean, std = (
            state["head.0.running_mean"].double(),
            torch.sqrt(state["head.0.running_var"].double() + 1e-6),
        )
        folded[f"{norm}.weight"] = (state[f"{norm}.weight"].double() / std).float()
        folded[f"{norm}.bias"] = ((state[f"{norm}.bias"].double() - mean) / std).float()
        folded["head.weight"], folded["head.bias"] = state["head.1.weight"], state["head.1.bias"]
        return folded
