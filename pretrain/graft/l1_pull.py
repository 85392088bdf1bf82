"""The L1 pull of grafted layers toward their starting weights."""

import torch


class L1Pull(torch.nn.Module):
    """weight * sum |w - w_start| over chosen parameters: keeps the grafted lower layers near where they
    started (the official ViT-L recipe: 1e-5 over the patch embedding and blocks 0-11).

    The starting values are buffers outside the engine's optimizer. The pull reads whole parameters,
    so it needs ZeRO stage <= 2 (the trainer refuses it under ZeRO-3).
    """

    def __init__(self, named_params, weight):
        super().__init__()
        self.weight, self.params = weight, [p for _, p in named_params]
        # Out of state_dict: every start (a resume too) takes them again before a checkpoint is loaded.
        object.__setattr__(self, "start", [p.detach().clone().float() for p in self.params])

    def forward(self):
        if self.start[0].device != self.params[0].device:
            object.__setattr__(self, "start", [s.to(self.params[0].device) for s in self.start])
        return self.weight * sum((p.float() - s).abs().sum() for p, s in zip(self.params, self.start))
