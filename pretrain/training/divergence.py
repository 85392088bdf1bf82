"""Stop a diverging run before its checkpoints are ruined.

A NaN loss is the last symptom of a divergence, not the first: the weights can grow for many steps
(and be saved) before it. The engine asks `DivergenceWatch.check` after every optimizer step, before a
checkpoint could be written; a problem stops the run with exit code 3, and `latest` stays the checkpoint
from before it. Signs, each configurable in `run.*`:

* a gradient norm that is not finite (always);
* a loss above `loss_spike` times its running mean (for losses that stay positive; 0: off);
* a gradient norm above `grad_norm_spike` times its running mean (0: off; DeepSpeed reports the norm
  under ZeRO stages 1-3 or with gradient clipping).

The running means are exponential (BETA), bias-corrected, and judge only after WARMUP steps. They are
part of the checkpoint, so a resumed run judges exactly as the uninterrupted one.

Recovery, as large runs do it: resume from an earlier tag (`run.resume_tag`), skip the batches around the
blow-up (`run.skip_batches`) and lower the learning rate (`run.lr_factor`).
"""

import math

BETA = 0.98
WARMUP = 20


class DivergenceWatch:
    def __init__(self, loss_spike=0.0, grad_norm_spike=0.0):
        self.loss_spike, self.grad_norm_spike = loss_spike, grad_norm_spike
        self.steps, self.loss_sum, self.norm_sum, self.norm_steps = 0, 0.0, 0.0, 0

    def _mean(self, total, steps):
        return total / (1 - BETA**steps) if steps else math.nan

    def check(self, loss, grad_norm):
        """What is wrong with this step (one line), or None; updates the running means when nothing is."""
        if grad_norm is not None and not math.isfinite(grad_norm):
            return f"the gradient norm is {grad_norm}"
        loss_mean = self._mean(self.loss_sum, self.steps)
        if self.loss_spike and self.steps >= WARMUP and loss_mean > 0 and loss > self.loss_spike * loss_mean:
            return (
                f"the loss {loss:.4g} is {loss / loss_mean:.1f}x its running mean {loss_mean:.4g} "
                "(run.loss_spike)"
            )
        if grad_norm is not None:
            norm_mean = self._mean(self.norm_sum, self.norm_steps)
            if (
                self.grad_norm_spike
                and self.norm_steps >= WARMUP
                and grad_norm > self.grad_norm_spike * norm_mean
            ):
                return (
                    f"the gradient norm {grad_norm:.4g} is {grad_norm / norm_mean:.1f}x its running mean "
                    f"{norm_mean:.4g} (run.grad_norm_spike)"
                )
            self.norm_sum, self.norm_steps = (
                BETA * self.norm_sum + (1 - BETA) * grad_norm,
                self.norm_steps + 1,
            )
        self.loss_sum, self.steps = BETA * self.loss_sum + (1 - BETA) * loss, self.steps + 1
        return None

    def state_dict(self):
        return {
            "steps": self.steps,
            "loss_sum": self.loss_sum,
            "norm_sum": self.norm_sum,
            "norm_steps": self.norm_steps,
        }

    def load_state_dict(self, state):
        self.steps, self.loss_sum = state["steps"], state["loss_sum"]
        self.norm_sum, self.norm_steps = state["norm_sum"], state["norm_steps"]
