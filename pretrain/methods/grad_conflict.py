"""Do two losses pull a layer the same way? The per-block cosine between their gradients.

Seed 001's figure for the hybrid MIM + CL loss: lower blocks agree (cosine > 0), higher blocks
conflict. `block_gradient_cosines` measures it on the current batch:

* gradients come from `torch.autograd.grad`, which does not accumulate into `.grad`, so DeepSpeed's
  gradient hooks (ZeRO-2's reduction buckets, ZeRO-3's reduce-scatter) never see them and the normal
  training step is untouched; the measurement costs two extra backward passes, only on the steps it
  runs on;
* under ZeRO-3 the engine's module hooks gather each block's parameters for the forward and backward
  passes as in training, and autograd returns the whole gradients; under ZeRO 0-2 they are whole anyway;
* each rank's gradients are summed over ranks before the cosine, which is then the cosine of the
  gradients of the global batch (a sum of per-rank cosines would not be).
"""

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from pretrain.core.distributed import is_distributed

# TensorBoard tag prefix of the per-block cosines (block NN: PREFIX + f"{NN:02d}"); graft.rule=auto reads them
COSINE_TAG = "grad_cosine/block_"


def block_gradient_cosines(loss_a, loss_b, blocks):
    """Cosine between d loss_a / d theta and d loss_b / d theta for the parameters of each block."""
    params = [[p for p in block.parameters() if p.requires_grad] for block in blocks]
    flat = [p for block in params for p in block]
    sums = []
    for loss in (loss_a, loss_b):
        grads = torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
        vector = torch.cat(
            [
                g.float().flatten() if g is not None else torch.zeros(_numel(p), device=loss.device)
                for g, p in zip(grads, flat)
            ]
        )
        if is_distributed():
            dist.all_reduce(vector)
        sums.append(vector)
    cosines, start = [], 0
    for block in params:
        size = sum(_numel(p) for p in block)
        a, b = sums[0][start : start + size], sums[1][start : start + size]
        cosines.append(float(torch.dot(a, b) / (a.norm() * b.norm()).clamp_min(1e-30)))
        start += size
    return cosines


def _numel(param):
    # ZeRO-3 empties partitioned params.
    return param.ds_numel if hasattr(param, "ds_numel") else param.numel()


def plot_cosines(cosines, width=320, height=160, split=None):
    """A bar chart (uint8 CHW tensor) of one cosine per block, -1 at the bottom, +1 at the top; with
    `split`, a vertical line before that block."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    middle, bar = height // 2, width / max(1, len(cosines))
    draw.line([(0, middle), (width, middle)], fill="gray")
    for index, value in enumerate(cosines):
        top = middle - value * (middle - 4)
        draw.rectangle(
            [index * bar + 2, min(top, middle), (index + 1) * bar - 2, max(top, middle)],
            fill=(40, 110, 200) if value >= 0 else (220, 80, 60),
        )
    if split is not None:
        draw.line([(split * bar, 0), (split * bar, height)], fill="black", width=2)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)
