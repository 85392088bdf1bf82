"""lg-pretrain: self-supervised pretraining of a timm ViT with DeepSpeed.

    lg-pretrain --config configs/demo.yaml [key=value ...] [--print-param-groups]

Runs alike as one process (`python -m pretrain.train`), under `torchrun` / `deepspeed` launchers and in
Slurm tasks. With `method: finetune` or `linprobe` and finetune.val set, the last checkpoint is then
measured on that split (pretrain.evaluation.supervised.supervised_result). Re-running the same command
resumes from RUN_DIR/ckpt/latest. Exit codes: 0 done, 2 bad config or input, 3 the loss diverged,
128 + N stopped by signal N after saving a checkpoint.
"""

import argparse
import logging
import os
import sys
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.core.distributed import default_env_for_single_process, rank
from pretrain.core.errors import TrainingDiverged, UserError, cli_entry
from pretrain.evaluation.supervised import supervised_result
from pretrain.graft import auto_split
from pretrain.graft.param_groups import format_param_groups, objective_param_groups
from pretrain.graft.start_weights import grafted_objective
from pretrain.methods import OBJECTIVES

log = logging.getLogger("lg-pretrain")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lg-pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML run config (see configs/); defaults apply to missing keys")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. optim.base_lr=1e-4 run.dir=runs/x"
    )
    parser.add_argument(
        "--print-param-groups", action="store_true", help="print the optimizer groups and exit"
    )
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return parser.parse_intermixed_args(argv)  # overrides before and after options


@cli_entry("lg-pretrain")
def main(argv=None):
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.print_param_groups:
        if config.graft.rule == "auto":
            if not config.graft.auto_from:
                raise UserError(
                    "graft.rule=auto without graft.auto_from decides the split in a probe run; "
                    "give graft.auto_from=RUN to print the groups it would choose"
                )
            config = auto_split.with_split(config, auto_split.decide_split(config, train=None)[0])
        objective = grafted_objective(config)
        print(format_param_groups(objective_param_groups(objective, config)))
        frozen = sum(p.numel() for p in objective.parameters() if not p.requires_grad)
        o = config.optim
        print(
            f"optimizer {o.optimizer}"
            + (f" (betas {tuple(o.betas)})" if o.optimizer == "adamw" else f" (momentum {o.momentum})")
            + f"; {frozen:,} parameters frozen"
        )
        return 0
    return run(config)


def run(config):
    """Train `config` in this process (one rank of a job, or a world of one); the exit code. The one
    code path of every launcher: this CLI under torchrun / deepspeed, and lg-submit's Slurm tasks."""
    # deepspeed picks its accelerator when it is imported: DS_ACCELERATOR must be set first
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from pretrain.training.engine import train

    default_env_for_single_process()
    try:
        auto_curve = None
        if config.graft.rule == "auto":  # first the probe (a hybrid run of its own) decides the split
            auto_curve, signum = auto_split.decide_split(config, train)
            if signum:
                return 128 + signum
            config = auto_split.with_split(config, auto_curve)
        step, signum = train(config, auto_curve)
    except TrainingDiverged as error:
        print(f"lg-pretrain: stopped: {error}", file=sys.stderr)
        return 3
    if signum:
        return 128 + signum
    if OBJECTIVES[config.method].scored_on_val and config.finetune.val:
        result = supervised_result(config, step)
        if rank() == 0:
            best = (
                f", best {result['best']['top1']:.2f} % at step {result['best']['step']}"
                if result["best"]
                else ""
            )
            log.info(
                "%s top-1 on %s: %.2f %%%s (%s)",
                config.method,
                config.finetune.val,
                result["top1"],
                best,
                Path(config.run.dir) / f"eval_{config.method}.json",
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
