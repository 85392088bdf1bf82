"""Per-step schedules: linear warmup then half-cosine for the learning rate (as MAE's lr_sched.py)."""

import math


def cosine_lr_factor(step, warmup_steps, total_steps, min_ratio=0.0):
    """Factor on the peak learning rate at `step`: 0 -> 1 linearly over the warmup, then a half cosine
    down to `min_ratio` (min_lr / lr) at `total_steps`. Each group's lr is this x lr x its lr_scale."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
