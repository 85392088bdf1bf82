"""Supervised fine-tuning of a pretrained encoder, MAE's recipe (main_finetune.py): the `finetune`
protocol of lg-eval, trained by the same engine as pretraining (DeepSpeed, checkpoints, resume, Slurm).

The model is timm's VisionTransformer with a head (`pretrain.models.create_classifier`), so the result
is a timm state_dict: `pool: mean` is timm's `global_pool="avg"`, which is MAE's global pool (the mean
of the patch tokens through `fc_norm`, no final `norm`; MAE's models_vit), `pool: token` the class token
after the final norm. The starting weights come through graft.init; the head and `fc_norm` start fresh
(the head at N(0, 2e-5)), and a pretrained `norm` is not used by the global-pool model, as in MAE's
main_finetune. The whole model trains, the position embedding included, with stochastic depth
(model.drop_path) and layer-wise lr decay (optim.layer_decay, applied by pretrain.graft.param_groups like
every
other lr rule).

Augmentation and loss are the pieces MAE itself takes from timm, used here as they are:
* per image, in the loader (pretrain.data.views.finetune_view): random resized crop, flip, timm's RandAugment
  (finetune.rand_augment, MAE's rand-m9-mstd0.5-inc1);
* per batch, here, on the normalized images: timm's RandomErasing (finetune.random_erasing, MAE 0.25,
  per-pixel noise, one box), then timm's Mixup (finetune.mixup 0.8 / cutmix 1.0, switch 0.5, label
  smoothing into the soft targets) with timm's SoftTargetCrossEntropy; without mixing, cross-entropy with
  finetune.label_smoothing. timm draws them from Python's and NumPy's generators, which the engine seeds
  per step, so a resumed run mixes as the uninterrupted one;
* optionally an EMA of the weights (finetune.ema_decay, timm's ModelEmaV3), measured beside them.
Small or symmetric-sensitive images, such as the demo's digits, need milder settings (its config says why).
"""

import functools

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from pretrain.core.errors import UserError
from pretrain.data.manifest import Manifest
from pretrain.data.views import INTERPOLATIONS, finetune_view
from pretrain.methods.base import Objective, config_section, register
from pretrain.models import create_classifier


@config_section("finetune")
class FinetuneConfig:
    """Supervised training on the labels of data.train: fine-tuning (method: finetune, lg-eval finetune)
    and linear probing (method: linprobe, lg-eval linear --protocol mae|mocov3). The starting weights
    are graft.init."""

    val: str = ""  # manifest of the split measured at the end (RUN_DIR/eval_<method>.json); empty: none
    # epochs between measurements on val during training (best and last kept); 0: the end only
    eval_every: float = 0.0
    keep_best: bool = True  # with eval_every: write the best measured weights to RUN_DIR/classifier_best.pth
    num_classes: int = 0  # 0: as many as data.train's manifest lists
    pool: str = "mean"  # mean (of the patch tokens, MAE's global pool, then a LayerNorm) | token
    label_smoothing: float = 0.1
    min_scale: float = 0.08  # augmentation: random resized crops of min_scale-100 % of the image ...
    # ... resized so (MAE; torchvision's default, MoCo v3's lincls: bilinear) ...
    interpolation: str = "bicubic"
    flip: bool = True  # ... horizontal flips ...
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # ... timm's RandAugment of this spec (empty: off) ...
    # ... timm's RandomErasing with this probability (MAE: 0.25, per-pixel noise) ...
    random_erasing: float = 0.0
    mixup: float = 0.0  # ... and timm's Mixup: mixup alpha (MAE: 0.8; 0: off) ...
    cutmix: float = 0.0  # ... cutmix alpha (MAE: 1.0; 0: off) ...
    mix_switch_prob: float = 0.5  # ... the chance of cutmix rather than mixup when both are on
    ema_decay: float = 0.0  # model EMA of the weights (timm's ModelEmaV3), measured beside them; 0: off
    allow_partial: bool = False  # score val even when fewer images could be read than its manifest lists

    def checks(self, config):
        return [
            (self.pool in ("mean", "token"), "finetune.pool", "mean or token"),
            (0 < self.min_scale <= 1, "finetune.min_scale", "in (0, 1]"),
            (
                self.interpolation in INTERPOLATIONS,
                "finetune.interpolation",
                f"one of {', '.join(INTERPOLATIONS)}",
            ),
            (
                self.rand_augment == "" or self.rand_augment.startswith("rand"),
                "finetune.rand_augment",
                "empty (off) or a timm RandAugment spec such as rand-m9-mstd0.5-inc1",
            ),
            (
                0 <= self.random_erasing <= 1 and 0 <= self.mix_switch_prob <= 1,
                "finetune.random_erasing",
                "in [0, 1] (mix_switch_prob too)",
            ),
            (self.mixup >= 0 and self.cutmix >= 0, "finetune.mixup", ">= 0 (cutmix too)"),
            (
                (self.mixup == 0 and self.cutmix == 0) or config.deepspeed.micro_batch_size % 2 == 0,
                "deepspeed.micro_batch_size",
                "even with finetune.mixup or cutmix (timm's Mixup pairs image i with image n-1-i)",
            ),
            (
                0 <= self.ema_decay < 1 and self.eval_every >= 0,
                "finetune.ema_decay",
                "in [0, 1) (finetune.eval_every >= 0)",
            ),
            (
                0 <= self.label_smoothing < 1 and self.num_classes >= 0,
                "finetune.label_smoothing",
                "in [0, 1) (num_classes >= 0)",
            ),
        ]


def num_classes_of(config):
    """finetune.num_classes, or the number of classes the train manifest lists."""
    if config.finetune.num_classes:
        return config.finetune.num_classes
    classes = Manifest.load(config.data.train).classes
    if not classes:
        raise UserError(f"{config.data.train} lists no classes; set finetune.num_classes")
    return len(classes)


def classifier_args_of(config, **extra):
    """create_classifier's arguments for a supervised run of `config` (fine-tuning and linear probing
    alike), with `extra` ones."""
    m = config.model
    return dict(
        arch=m.arch,
        img_size=config.data.img_size,
        patch_size=m.patch,
        num_classes=num_classes_of(config),
        pool=config.finetune.pool,
        **extra,
    )


@register("finetune")
class FineTune(Objective):
    config_sections = ("finetune",)
    uses_labels = True
    scored_on_val = True
    fresh_weights = ("head.", "fc_norm.")  # not taken from graft.init: they start at their own init

    def __init__(
        self,
        classifier_args,
        label_smoothing=0.1,
        augmentation=None,
        random_erasing=0.0,
        mixup=0.0,
        cutmix=0.0,
        mix_switch_prob=0.5,
        ema_decay=0.0,
    ):
        super().__init__()
        self.view = functools.partial(finetune_view, **(augmentation or {}))
        self.classifier_args, self.label_smoothing = classifier_args, label_smoothing
        self.encoder = self.make_classifier()
        num_classes = classifier_args["num_classes"]
        self.erase = (
            RandomErasing(random_erasing, mode="pixel", max_count=1, device="cpu") if random_erasing else None
        )
        self.mix = (
            Mixup(
                mixup_alpha=mixup,
                cutmix_alpha=cutmix,
                switch_prob=mix_switch_prob,
                mode="batch",
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
            if mixup or cutmix
            else None
        )
        self.ema_decay = ema_decay
        # a timm ModelEmaV3 outside the module tree: not trained, not in the engine
        self.__dict__["ema"] = None

    @classmethod
    def from_config(cls, config):
        c, m = config.finetune, config.model
        classifier_args = classifier_args_of(
            config, drop_path=m.drop_path, grad_checkpointing=m.grad_checkpointing
        )
        augmentation = dict(
            min_scale=c.min_scale, flip=c.flip, rand_augment=c.rand_augment, interpolation=c.interpolation
        )
        return cls(
            classifier_args,
            label_smoothing=c.label_smoothing,
            augmentation=augmentation,
            random_erasing=c.random_erasing,
            mixup=c.mixup,
            cutmix=c.cutmix,
            mix_switch_prob=c.mix_switch_prob,
            ema_decay=c.ema_decay,
        )

    def make_classifier(self):
        """A new module of this model's structure (the model, and copies that measure its weights)."""
        return create_classifier(**self.classifier_args)

    @staticmethod
    def classifier_state(state):
        """The timm state_dict of the model's state (keys of `encoder`): it is one already."""
        return dict(state)

    def logits(self, images):
        return self.encoder(images)

    def augment(self, images, labels):
        """(images, targets) after erasing and mixing: targets are class indices, or (N, classes)
        distributions when mixing is on."""
        if self.erase is not None:
            self.erase.device = images.device
            images = self.erase(images.clone())
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        return images, labels

    def forward(self, images, labels):
        mixed, targets = self.augment(images, labels)
        logits = self.logits(mixed)
        if targets.dim() == 2:
            loss = SoftTargetCrossEntropy()(logits.float(), targets)
        else:
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
        accuracy = (logits.detach().argmax(dim=1) == labels).float().mean()
        return self.regularized({"loss": loss, "train_top1": accuracy})

    def after_step(self, step, total_steps):
        if not self.ema_decay:
            return
        if self.ema is None:  # from the weights after the first update (timm's starts one step earlier)
            self.__dict__["ema"] = self._new_ema()
        else:
            self.ema.update(self.encoder)

    def _new_ema(self, state=None):
        """timm's ModelEmaV3 over a float32 copy of the model (ZeRO-1/2 hold whole parameters on every rank;
        the engine refuses the EMA under ZeRO-3)."""
        with torch.random.fork_rng(devices=[]):  # the copy's initialization must not move the training's RNG
            copy = self.make_classifier()
        copy.load_state_dict(state or {k: v.float() for k, v in self.encoder.state_dict().items()})
        return ModelEmaV3(copy.to(next(self.encoder.parameters()).device), decay=self.ema_decay)

    def extra_state(self):
        return {"ema": self.ema.module.state_dict()} if self.ema is not None else {}

    def load_extra_state(self, state):
        if state.get("ema") is not None:
            self.__dict__["ema"] = self._new_ema(state["ema"])

    @torch.no_grad()
    def correct(self, images, labels):
        """How many of `images` the classifier gets right (eval mode is the caller's business)."""
        return int((self.logits(images).argmax(dim=1) == labels).sum())
