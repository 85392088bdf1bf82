"""Optimizer parameter groups from per-parameter layer ids: the one place layer-wise learning rates live.

Every parameter of an objective gets a layer id: the encoder's patch embedding, class token and
position embedding are layer 0, encoder block i is layer i + 1, and everything after the blocks (final
norm, decoders, projectors, predictors) is layer depth + 1. A rule maps a layer id to an lr_scale;
parameters with equal (lr_scale, weight decay) share one group, so a uniform rule gives two groups
whatever the depth (DeepSpeed slows down with many groups).
"""
import re

BLOCK = re.compile(r"(?:^|\.)encoder\.blocks\.(\d+)\.")
EMBEDDING = re.compile(r"(?:^|\.)encoder\.(patch_embed|cls_token|pos_embed|reg_token)")
NO_WEIGHT_DECAY = ("pos_embed", "cls_token", "mask_token", "reg_token")


def layer_id(name, depth):
    """Layer id of parameter `name` (named as in the objective, e.g. encoder.blocks.3.attn.qkv.weight)."""
    if EMBEDDING.search(name):
        return 0
    block = BLOCK.search(name)
    return int(block.group(1)) + 1 if block else depth + 1


def uses_weight_decay(name, param):
    """Biases, norms (every 1-D parameter) and position embeddings / tokens are not decayed."""
    shape = getattr(param, "ds_shape", param.shape)  # ZeRO-3 zero.Init leaves p.shape empty
    return len(shape) > 1 and not name.split(".")[-1].endswith(NO_WEIGHT_DECAY)


def layer_decay_rule(depth, decay):
    """Fine-tuning layer decay (BEiT / MAE): lr_scale = decay ** (depth + 1 - layer_id)."""
    return lambda layer: decay ** (depth + 1 - layer)


def param_groups(model, depth, weight_decay, lr_scale_of_layer=lambda layer: 1.0):
    """Groups for torch optimizers: dicts with params, weight_decay, lr_scale and layer_ids (sorted).

    Frozen parameters (requires_grad False) are left out.
    """
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, depth)
        decay = weight_decay if uses_weight_decay(name, param) else 0.0
        scale = float(lr_scale_of_layer(layer))
        group = groups.setdefault((scale, decay), {"params": [], "names": [], "weight_decay": decay,
                                                   "lr_scale": scale, "layer_ids": set()})
        group["params"].append(param)
        group["names"].append(name)
        group["layer_ids"].add(layer)
    ordered = sorted(groups.values(), key=lambda g: (min(g["layer_ids"]), g["weight_decay"]))
    for group in ordered:
        group["layer_ids"] = sorted(group["layer_ids"])
    return ordered


def format_param_groups(groups):
    """One line per group: layer ids, lr_scale, weight decay, parameter count."""
    lines = [f"{'group':>5}  {'layer ids':<24}{'lr_scale':>10}{'weight_decay':>14}{'params':>14}{'tensors':>9}"]
    for index, group in enumerate(groups):
        ids = group["layer_ids"]
        span = f"{ids[0]}-{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 1 else \
            ",".join(map(str, ids))
        count = sum(getattr(p, "ds_numel", p.numel()) for p in group["params"])
        lines.append(f"{index:>5}  {span:<24}{group['lr_scale']:>10.4g}{group['weight_decay']:>14.4g}"
                     f"{count:>14,}{len(group['params']):>9}")
    return "\n".join(lines)


def objective_param_groups(objective, config):
    """The groups of a training run: layer decay from config.optim (1.0 = every layer alike)."""
    depth = len(objective.encoder.blocks)
    return param_groups(objective, depth, config.optim.weight_decay, layer_decay_rule(depth, config.optim.layer_decay))
