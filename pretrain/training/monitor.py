"""What a run reports: a console line every N steps (with ETA) and TensorBoard under RUN_DIR/tb (rank 0)."""

import logging
import os
import time

import torch

log = logging.getLogger("lg-pretrain")


def memory_bytes(device):
    """Peak CUDA memory of this process on an accelerator, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Monitor:
    def __init__(self, run_dir, enabled, total_steps, global_batch):
        self.enabled, self.total_steps, self.global_batch = enabled, total_steps, global_batch
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        self.window_start, self.window_steps = time.perf_counter(), 0

    def config(self, text):
        if self.writer:
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def step_done(self):
        self.window_steps += 1

    def report(self, step, scalars):
        """Console line and TensorBoard scalars for `step`; throughput over the steps since the last
        report."""
        elapsed = time.perf_counter() - self.window_start
        step_time = elapsed / max(1, self.window_steps)
        scalars = {
            **scalars,
            "perf/step_time_s": step_time,
            "perf/images_per_s": self.global_batch / step_time,
        }
        self.window_start, self.window_steps = time.perf_counter(), 0
        if not self.enabled:
            return
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, step)
        eta = (self.total_steps - step) * step_time
        log.info(
            "step %d/%d  loss %.4f  lr %.3g  %.0f img/s  eta %s",
            step,
            self.total_steps,
            scalars["loss"],
            scalars["lr/last_group"],
            scalars["perf/images_per_s"],
            _duration(eta),
        )

    def extra(self, step, scalars, pictures):
        """A method's diagnostics: scalars, and single images (uint8 CHW)."""
        if self.writer:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)
            for name, picture in pictures.items():
                self.writer.add_image(name, picture, step)

    def images(self, step, tag, images):
        if self.writer and images is not None:
            from torchvision.utils import make_grid

            self.writer.add_image(tag, make_grid(images.float().cpu(), nrow=len(images) // 3), step)

    def close(self):
        if self.writer:
            self.writer.close()


def _duration(seconds):
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )
