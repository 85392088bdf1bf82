"""The interface between a method and the engine, and the registries a method's file adds itself to.

A method is one file in this package: its config section (a dataclass under `@config_section(name)`),
its views (from pretrain.data.views, configured by that section) and its `Objective` under
`@register(name)`. pretrain.methods imports every file here, and pretrain.config builds the run
config from SECTIONS, so nothing else needs to know the method.
"""

import dataclasses
import typing

import torch
from torch import nn

OBJECTIVES: dict[str, type["Objective"]] = {}  # `method:` -> its Objective
SECTIONS: dict[str, type] = {}  # a method's config section name -> its dataclass


def register(name):
    """Class decorator: the Objective that `method: name` trains."""

    def add(cls):
        if OBJECTIVES.get(name, cls) is not cls:
            raise ValueError(f"two methods are registered as {name!r}: {OBJECTIVES[name]} and {cls}")
        OBJECTIVES[name] = cls
        return cls

    return add


def config_section(name):
    """Dataclass decorator: a section `name:` of the run config, read by the method(s) that list it in
    `config_sections`. It may define `checks(config)`: (condition, key, what it must be) triples that
    pretrain.config turns into named errors."""

    def add(cls):
        cls = dataclasses.dataclass(cls)
        if SECTIONS.get(name, cls) is not cls and SECTIONS[name].__qualname__ != cls.__qualname__:
            raise ValueError(f"two config sections are registered as {name!r}")
        SECTIONS[name] = cls
        return cls

    return add


class Objective(nn.Module):
    """A self-supervised method: it owns its encoder and heads.

    * `from_config(config)`: the classmethod that builds it from the run config, reading the shared
      sections (model, data) and its own (`config.<section>`), passing them by name.
    * `config_sections`: the run config's sections the method reads besides the shared ones
      (pretrain.config.SHARED_SECTIONS); a resumed run must not change them, and may change the others.
    * `decay_exempt`: the parameters the method's official recipe does not weight-decay ("none", "1d"
      or "1d_tokens": see pretrain.graft.param_groups.uses_weight_decay); optim.decay_exempt overrides it.
    * `view`: the name of the augmentation the loader must produce (see pretrain.data.views), or a function
      of img_size that makes it (a configured one).
    * `encoder`: the timm ViT that is exported at the end.
    * `forward(images)` -> dict with a scalar `loss` and any other scalars worth logging; `images` is a
      normalized float batch, or a list of them for multi-view methods. With `uses_labels` (supervised
      fine-tuning) the engine calls `forward(images, labels)`.
    * `after_step(step, total_steps)`: called on every rank after each optimizer step (momentum updates).
    * `extra_state()` / `load_extra_state(state)`: what the checkpoint must hold besides the engine's
      module and optimizer (say, a momentum encoder kept outside the engine).
    * `images_to_log(images)`: an optional (N, 3, H, W) grid source for TensorBoard, or None.
    * `diagnostics(images)`: extra measurements every run.diagnostics_every steps, on every rank:
      (scalars, images) dicts for TensorBoard.
    * `on_encoder_loaded()`: called after starting weights were copied into `encoder` (grafting).
    * `fresh_weights`: prefixes of `encoder` keys that keep their own initialization instead of coming
      from graft.init (a fine-tuning head).
    * `scored_on_val`: a supervised method whose run ends with its top-1 on finetune.val
      (pretrain.evaluation.supervised), when that is set.
    * `l1_pull`: an optional `pretrain.graft.l1_pull.L1Pull`; `regularized(outputs)` adds it to the loss.
    """

    view: "str | typing.Callable" = "eval"
    config_sections: tuple[str, ...] = ()
    decay_exempt: str = "1d_tokens"
    uses_labels: bool = False
    scored_on_val: bool = False
    fresh_weights: tuple[str, ...] = ()
    encoder: nn.Module

    def __init__(self):
        super().__init__()
        self.l1_pull = None  # an instance attribute: a class attribute would hide the registered module

    @classmethod
    def from_config(cls, config) -> "Objective":
        raise NotImplementedError(f"{cls.__name__} must say how the run config builds it (from_config)")

    def regularized(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.l1_pull is not None:
            pull = self.l1_pull()
            outputs["loss"] = outputs["loss"] + pull
            outputs["loss_l1_pull"] = pull.detach()
        return outputs

    def on_encoder_loaded(self) -> None:
        pass

    def after_step(self, step: int, total_steps: int) -> None:
        pass

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def images_to_log(self, images) -> torch.Tensor | None:
        return None

    def diagnostics(self, images) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        return {}, {}
