"""The effective DeepSpeed config of a run: the JSON file the run config names, plus what the run config
owns (batch sizes, precision, clipping), and the refusals of combinations DeepSpeed would get wrong."""

import json

from deepspeed.accelerator import get_accelerator

from pretrain.core.errors import UserError
from pretrain.core.shipped import resolve_shipped

FP16 = {
    "enabled": True,
    "loss_scale": 0,
    "initial_scale_power": 16,
    "loss_scale_window": 1000,
    "hysteresis": 2,
    "min_loss_scale": 1,
}


def deepspeed_config(config, world):
    """The effective DeepSpeed config: the JSON file named by the run config, plus batch sizes,
    precision and clipping from the run config (saved as RUN_DIR/ds_config.json)."""
    path = resolve_shipped(config.deepspeed.config)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"config key deepspeed.config: {path} does not exist") from None
    except ValueError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    for owned in ("optimizer", "scheduler", "bf16", "fp16", "train_batch_size", "gradient_clipping"):
        if owned in ds:
            raise UserError(f"{path}: remove {owned!r}; the run config sets it (optim.*, deepspeed.*)")
    d = config.deepspeed
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if d.precision == "fp16" and not get_accelerator().is_fp16_supported():
        raise UserError(
            f"deepspeed.precision=fp16 is not supported by DeepSpeed's {get_accelerator().device_name()} "
            "accelerator; use bf16 or fp32 here"
        )
    if config.graft.l1_weight > 0 and stage == 3:
        raise UserError("graft.l1_weight needs whole parameters on every rank; use ZeRO stage <= 2 with it")
    if d.precision == "bf16" and stage == 0:
        raise UserError(
            "bf16 with ZeRO stage 0 trains through DeepSpeed's fp16-style optimizer and drifts "
            "from fp32; use ds_configs/zero1.json or higher for bf16"
        )
    if config.optim.optimizer == "lars" and stage > 0:
        raise UserError(
            f"optim.optimizer=lars needs whole parameters (its trust ratio is per parameter, and ZeRO "
            f"stage {stage} flattens each group into one tensor per rank); use ds_configs/zero0.json"
        )
    if config.finetune.ema_decay and stage == 3 and config.method == "finetune":
        raise UserError(
            "finetune.ema_decay needs whole parameters on every rank; use ZeRO stage <= 2 with it"
        )
    if config.method == "linprobe" and d.precision != "fp32":
        raise UserError(
            f"method linprobe keeps the frozen encoder's weights as they are, which deepspeed.precision="
            f"{d.precision} would round; use fp32 (on CUDA the encoder runs under bf16 autocast)"
        )
    if config.optim.optimizer != "adamw" and stage > 0:
        ds["zero_allow_untested_optimizer"] = True  # SGD is elementwise: ZeRO's partitions change nothing
    ds.update(
        train_micro_batch_size_per_gpu=d.micro_batch_size,
        gradient_accumulation_steps=d.grad_accum,
        train_batch_size=d.micro_batch_size * d.grad_accum * world,
        gradient_clipping=config.optim.clip_grad,
        steps_per_print=10**12,
        wall_clock_breakdown=False,
    )
    if d.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif d.precision == "fp16":
        ds["fp16"] = dict(FP16)
    return ds
