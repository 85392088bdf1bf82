"""MAE training step: ours (DeepSpeed engine + pretrain.methods.MAE) vs a plain-PyTorch reference.

    python -m bench.train_step [--arch vit_small] [--batch-size 32] [--steps 3] [--repeats 2]

The reference is MAE as facebookresearch/mae's models_mae.py writes it (patchify, per-sample random
masking, encoder on the visible tokens, decoder with mask tokens, norm-pix MSE on the masked patches),
compactly, with timm's Block and PatchEmbed, trained by torch AdamW with no DeepSpeed. Both run the
same architecture (224 px, patch 16, decoder 8 x 512), batch and fp32 in this one process, on one
random batch (no data loading). Also measured: this machine's fp32 matmul FLOP/s, before every repeat and
after the last (the best is the peak), to give model FLOP utilization, never printed above 1; model FLOPs
are counted by torch.utils.flop_counter on the reference (it misses the fused CPU attention kernel, ~5 % of
a ViT-S step). Ours / reference is given per repeat beside the medians' ratio: its spread is the noise.
Prints a table and a JSON line.
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch
from timm.layers import PatchEmbed, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from bench.photos import cpu_count

DIMS = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
}


class ReferenceMAE(nn.Module):
    """MAE, compactly, as in models_mae.py."""

    def __init__(
        self, dim, depth, heads, img_size=224, patch=16, decoder_dim=512, decoder_depth=8, mask_ratio=0.75
    ):
        super().__init__()
        self.patch, self.mask_ratio = patch, mask_ratio
        self.patch_embed = PatchEmbed(img_size, patch, 3, dim)
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer(
            "pos_embed", torch.cat([torch.zeros(1, dim), build_sincos2d_pos_embed(list(grid), dim)])[None]
        )
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed",
            torch.cat([torch.zeros(1, decoder_dim), build_sincos2d_pos_embed(list(grid), decoder_dim)])[None],
        )
        self.decoder_blocks = nn.Sequential(
            *[Block(decoder_dim, 16, 4.0, qkv_bias=True) for _ in range(decoder_depth)]
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch * patch * 3)

    def forward(self, imgs):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        n, length, dim = x.shape
        keep = int(length * (1 - self.mask_ratio))
        ids_shuffle = torch.argsort(torch.rand(n, length), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep, None].repeat(1, 1, dim))
        mask = torch.ones(n, length)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(n, -1, -1), x], 1)
        x = self.decoder_embed(self.norm(self.blocks(x)))
        tokens = torch.cat([x[:, 1:], self.mask_token.repeat(n, length - keep, 1)], 1)
        tokens = torch.gather(tokens, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1], tokens], 1) + self.decoder_pos_embed
        pred = self.decoder_pred(self.decoder_norm(self.decoder_blocks(x)))[:, 1:]
        p = self.patch
        target = imgs.reshape(n, 3, imgs.shape[2] // p, p, imgs.shape[3] // p, p)
        target = torch.einsum("nchpwq->nhwpqc", target).reshape(n, length, -1)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def time_steps(step, steps):
    step()  # warm-up
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


def reference_step_time(arch, images, steps):
    torch.manual_seed(0)
    model = ReferenceMAE(*DIMS[arch])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(images).backward()
        optimizer.step()

    with FlopCounterMode(display=False) as counter:
        model(images).backward()
    return time_steps(step, steps), counter.get_total_flops()


def our_step_time(arch, images, steps, zero_config):
    import deepspeed

    from pretrain.config import load_config
    from pretrain.graft.param_groups import objective_param_groups
    from pretrain.graft.start_weights import grafted_objective
    from pretrain.training.ds_config import deepspeed_config

    config = load_config(
        None,
        [
            f"model.arch={arch}",
            "deepspeed.precision=fp32",
            f"deepspeed.config={zero_config}",
            f"deepspeed.micro_batch_size={len(images)}",
        ],
    )
    torch.manual_seed(0)
    objective = grafted_objective(config)
    groups = [
        {"params": g["params"], "weight_decay": g["weight_decay"]}
        for g in objective_param_groups(objective, config)
    ]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    engine, *_ = deepspeed.initialize(
        model=objective, optimizer=optimizer, config=deepspeed_config(config, 1)
    )

    def step():
        engine.backward(engine(images)["loss"])
        engine.step()

    return time_steps(step, steps)


def matmul_flops(size=2048, repeats=10):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def mfu(model_flop_per_s, peak):
    """Model FLOP utilization, or None where it would exceed 1: an impossible figure is not printed."""
    value = model_flop_per_s / peak
    return round(value, 3) if value <= 1 else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="vit_small", choices=sorted(DIMS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pretrain.core.distributed import default_env_for_single_process

    default_env_for_single_process()
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    times = {"reference": [], "ours_zero0": [], "ours_zero1": []}
    peaks, flops = [], None
    for _ in range(args.repeats):  # interleaved, so that machine noise hits the peak and all contenders alike
        peaks.append(matmul_flops())
        seconds, flops = reference_step_time(args.arch, images, args.steps)
        times["reference"].append(seconds)
        times["ours_zero0"].append(our_step_time(args.arch, images, args.steps, "ds_configs/zero0.json"))
        times["ours_zero1"].append(our_step_time(args.arch, images, args.steps, "ds_configs/zero1.json"))
    peaks.append(matmul_flops())
    peak = max(peaks)  # the best the machine did: a busy moment lowers a measurement, never raises it
    median = {name: statistics.median(values) for name, values in times.items()}
    rows = {
        name: {
            "step_s": round(s, 3),
            "img_per_s": round(args.batch_size / s, 2),
            "model_tflop_per_s": round(flops / s / 1e12, 4),
            "mfu": mfu(flops / s, peak),
        }
        for name, s in median.items()
    }
    # ours / reference within each repeat: the spread says how far the medians' ratio can be trusted
    spread = {
        name: [round(r / o, 3) for r, o in zip(times["reference"], times[name])]
        for name in ("ours_zero0", "ours_zero1")
    }
    result = {
        "bench": "train_step",
        "arch": args.arch,
        "batch_size": args.batch_size,
        "precision": "fp32",
        "machine": f"{platform.machine()} {cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "matmul_tflop_per_s": round(peak / 1e12, 4),
        "matmul_tflop_per_s_runs": [round(p / 1e12, 4) for p in peaks],
        "model_gflop_per_step": round(flops / 1e9, 1),
        "rows": rows,
        "seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()},
        "ours_zero0_vs_reference": round(median["reference"] / median["ours_zero0"], 3),
        "ours_zero1_vs_reference": round(median["reference"] / median["ours_zero1"], 3),
        "vs_reference_per_repeat": spread,
        "target": 1.0,
    }
    print(
        f"{'MAE step, ' + args.arch + ', batch ' + str(args.batch_size):<34}{'s/step':>8}{'img/s':>8}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'x ref':>7}  x ref per repeat"
    )
    for name, row in rows.items():
        shown = "-" if row["mfu"] is None else f"{row['mfu']:.2f}"
        repeats = ", ".join(f"{r:.2f}" for r in spread.get(name, []))
        print(
            f"{name:<34}{row['step_s']:>8.2f}{row['img_per_s']:>8.2f}{row['model_tflop_per_s']:>9.3f}"
            f"{shown:>7}{median['reference'] / median[name]:>7.2f}  {repeats}"
        )
    print(
        f"fp32 matmul peak {peak / 1e12:.3f} TFLOP/s (best of {len(peaks)}, interleaved with the repeats);"
        f" model {flops / 1e9:.0f} GFLOP per step (forward + backward)"
    )
    if any(row["mfu"] is None for row in rows.values()):
        print(
            "MFU not shown: a model rate above the measured matmul peak means the peak was measured in a busy"
            " moment (or the FLOP count is off); rerun on a quiet machine"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
