"""Optimizer parameter groups from per-parameter layer ids: the one place layer-wise learning rates live.

Every parameter of an objective gets a layer id: the encoder's patch embedding, class token and
position embedding are layer 0, encoder block i is layer i + 1, and everything after the blocks (final
norm, decoders, projectors, predictors) is layer depth + 1. A rule maps a layer id to an lr_scale;
parameters with equal (lr_scale, weight decay) share one group, so a uniform rule gives two groups
whatever the depth (DeepSpeed slows down with many groups).
"""

import math
import re
from collections.abc import Callable

import torch

from pretrain.methods.base import Objective

BLOCK = re.compile(r"(?:^|\.)encoder\.blocks\.(\d+)\.")
EMBEDDING = re.compile(r"(?:^|\.)encoder\.(patch_embed|cls_token|pos_embed|reg_token)")
TOKENS = ("pos_embed", "cls_token", "mask_token", "reg_token")


def layer_id(name, depth):
    """Layer id of parameter `name` (named as in the objective, e.g. encoder.blocks.3.attn.qkv.weight)."""
    if EMBEDDING.search(name):
        return 0
    block = BLOCK.search(name)
    return int(block.group(1)) + 1 if block else depth + 1


def uses_weight_decay(name, param, exempt="1d_tokens"):
    """Whether `param` is weight-decayed under the exemption rule `exempt` (each method's recipe, or
    optim.decay_exempt):

    * "none": every parameter is decayed (MoCo v3: AdamW over model.parameters(), main_moco.py);
    * "1d": all but biases and norm weights, the parameters of fewer than 2 dims (MAE's pretraining
      through timm's add_weight_decay; the Layer-Grafted recipe's param_groups_lrd_moco);
    * "1d_tokens": nor the position embeddings and class / mask / register tokens (MAE's fine-tuning
      and BEiT, which add the model's no_weight_decay() names).
    """
    if exempt == "none":
        return True
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 zero.Init leaves p.shape empty
    if len(shape) < 2:
        return False
    return exempt == "1d" or not name.split(".")[-1].endswith(TOKENS)


def layer_decay_rule(depth, decay):
    """Fine-tuning layer decay (BEiT / MAE): lr_scale = decay ** (depth + 1 - layer_id)."""
    return lambda layer: decay ** (depth + 1 - layer)


def graft_rule(graft, depth):
    """lr_scale by layer id for layer-grafted pretraining (config section `graft`).

    * list: the official recipe's list of scales spread evenly over the blocks (depth // len per
      entry; the embeddings take the first entry, everything above the blocks the last). Its ViT-B
      run, lr_layer_wise "1.5e-5,1.5e-5,1.5e-4" with --lr 1, is scales [0.1, 0.1, 1.0] on MoCo v3's
      base_lr 1.5e-4: blocks 0-7 at a tenth of blocks 8-11 and the heads.
    * split: lower_scale for layer ids 0 .. split (embeddings, blocks 0 .. split-1), upper_scale above;
      auto is split with the split chosen from the measured gradient cosines (pretrain/graft/auto_split.py).
    * ramp: the same two scales joined smoothly: a logistic step in log-scale centred between block
      split-1 and block split, ramp_width layers wide.
    * freeze: the lower part gets scale 0 (frozen, the paper's first variant), the upper upper_scale.
    """
    if graft.rule == "list":
        scales, per_entry = graft.scales, max(1, depth // len(graft.scales))
        return lambda layer: (
            scales[0]
            if layer == 0
            else scales[min((layer - 1) // per_entry, len(scales) - 1)]
            if layer <= depth
            else scales[-1]
        )
    # "auto" is "split" with the split filled in from measurements (pretrain/graft/auto_split.py).
    if graft.rule in ("split", "auto"):
        return lambda layer: graft.lower_scale if layer <= graft.split else graft.upper_scale
    if graft.rule == "ramp":
        ratio = math.log(graft.upper_scale / graft.lower_scale)
        return lambda layer: (
            graft.lower_scale
            * math.exp(ratio / (1 + math.exp(-(layer - graft.split - 0.5) / graft.ramp_width)))
        )
    if graft.rule == "freeze":
        return lambda layer: 0.0 if layer <= graft.split else graft.upper_scale
    return lambda layer: 1.0


def param_groups(
    model: torch.nn.Module,
    depth: int,
    weight_decay: float,
    lr_scale_of_layer: Callable[[int], float] = lambda layer: 1.0,
    decay_exempt: str = "1d_tokens",
) -> list[dict]:
    """Groups for torch optimizers: dicts with params, weight_decay, lr_scale and layer_ids (sorted);
    `decay_exempt` names the parameters without weight decay (see `uses_weight_decay`).

    Frozen parameters (requires_grad False) are left out, and so are layers whose lr_scale is 0 (the
    freeze rule: pretrain.graft.start_weights freezes them when it builds the objective).
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        scale = float(lr_scale_of_layer(layer))
        if scale == 0:
            continue
        decay = weight_decay if uses_weight_decay(name, param, decay_exempt) else 0.0
        group = groups.setdefault(
            (scale, decay),
            {"params": [], "names": [], "weight_decay": decay, "lr_scale": scale, "layer_ids": set()},
        )
        group["params"].append(param)
        group["names"].append(name)
        group["layer_ids"].add(layer)
    ordered = sorted(groups.values(), key=lambda g: (min(g["layer_ids"]), g["weight_decay"]))
    for group in ordered:
        group["layer_ids"] = sorted(group["layer_ids"])
    return ordered


def layer_span(layer_ids):
    """'0-8' for a run of consecutive ids, '3,7' otherwise."""
    ids = list(layer_ids)
    consecutive = len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1))
    return f"{ids[0]}-{ids[-1]}" if consecutive else ",".join(map(str, ids))


def format_param_groups(groups: list[dict]) -> str:
    """One line per group: layer ids, lr_scale, weight decay, parameter count."""
    lines = [
        f"{'group':>5}  {'layer ids':<24}{'lr_scale':>10}{'weight_decay':>14}{'params':>14}{'tensors':>9}"
    ]
    for index, group in enumerate(groups):
        span = layer_span(group["layer_ids"])
        count = sum(getattr(p, "ds_numel", p.numel()) for p in group["params"])
        lines.append(
            f"{index:>5}  {span:<24}{group['lr_scale']:>10.4g}{group['weight_decay']:>14.4g}"
            f"{count:>14,}{len(group['params']):>9}"
        )
    return "\n".join(lines)


def lr_scale_rule(config, depth: int) -> Callable[[int], float]:
    """A run's learning-rate scale per layer id: the graft rule, or layer decay from config.optim (1.0 =
    every layer alike)."""
    if config.graft.rule != "none":
        return graft_rule(config.graft, depth)
    return layer_decay_rule(depth, config.optim.layer_decay)


def objective_param_groups(objective: Objective, config) -> list[dict]:
    """The groups of a training run: lr_scale_rule's scales; weight-decay exemptions from
    optim.decay_exempt, or the method's recipe when it is empty."""
    depth = len(objective.encoder.blocks)
    exempt = config.optim.decay_exempt or objective.decay_exempt
    return param_groups(objective, depth, config.optim.weight_decay, lr_scale_rule(config, depth), exempt)
