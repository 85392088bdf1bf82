"""The optimizer of a run (optim.optimizer) over the parameter groups of pretrain.graft.param_groups.

* adamw: torch's AdamW (optim.betas): pretraining and fine-tuning. DeepSpeed's fused / CPU Adam differ
  from it by ~1e-6 after a resume, so the engine takes torch's as a client optimizer.
* sgd: torch's SGD with optim.momentum: MoCo v3's linear probe (main_lincls.py).
* lars: timm's Lars, MAE's linear probe (main_linprobe.py uses util/lars.py). The two compute the same
  update when every group of 1-D parameters (biases, norms) has weight decay 0 — MAE's optimizer adapts
  parameters of 2 or more dims only — so each group is split here: matrices with `always_adapt` (the
  trust ratio 0.001 |w| / |g| even at weight decay 0), vectors without, and eps 0 as in MAE's.
"""

import timm.optim
import torch

LARS_TRUST_COEFF = 0.001  # MAE's util/lars.py and timm's default


def make_optimizer(groups, lr, optim):
    """A torch optimizer over `groups` (dicts with params, weight_decay, lr_scale and any extra keys,
    which stay in the optimizer's param_groups) at learning rate lr x lr_scale; `optim` is config.optim."""
    torch_groups = [{**g, "lr": lr * g["lr_scale"]} for g in groups]
    if optim.optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=lr, betas=tuple(optim.betas))
    if optim.optimizer == "sgd":
        return torch.optim.SGD(torch_groups, lr=lr, momentum=optim.momentum)
    if optim.optimizer == "lars":
        split = []
        for group in torch_groups:
            for adapt in (True, False):
                params = [p for p in group["params"] if (len(getattr(p, "ds_shape", p.shape)) > 1) == adapt]
                if params:
                    split.append({**group, "params": params, "always_adapt": adapt})
        return timm.optim.Lars(split, lr=lr, momentum=optim.momentum, trust_coeff=LARS_TRUST_COEFF, eps=0.0)
    raise ValueError(f"unknown optimizer {optim.optimizer!r}")
