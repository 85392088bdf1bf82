"""The result of a fine-tuning or linear-probe run: its last checkpoint measured on finetune.val."""

import json
from pathlib import Path

import timm
import torch
import torch.distributed as dist

from pretrain.core import checkpoint
from pretrain.core.distributed import is_distributed, rank
from pretrain.core.errors import UserError
from pretrain.core.files import save_atomic
from pretrain.core.weights import consolidated_state_dict, encoder_state
from pretrain.data.manifest import Manifest
from pretrain.evaluation.validation import best_record, top1_counts
from pretrain.graft.start_weights import grafted_objective
from pretrain.methods import OBJECTIVES
from pretrain.methods.finetune import num_classes_of
from pretrain.models import classifier_kwargs


def supervised_result(config, step: int) -> dict:
    """Top-1 of a fine-tuning or linear-probe run `config` (its latest checkpoint) on finetune.val, as a
    result dict, with the best of its periodic measurements (finetune.eval_every) when there were any.

    Rank 0 consolidates the checkpoint into RUN_DIR/classifier.pth, a float32 timm state_dict that
    `timm.create_model(**classifier.json["timm"])` loads strictly (a linear probe's BatchNorm folded into
    the LayerNorm before
    its head); every rank then classifies its share of the val shards and the counts are summed. A linear
    probe's frozen weights are compared with graft.init's (`frozen_unchanged`; an error if they moved).
    Rank 0 writes RUN_DIR/eval_<method>.json and `eval/<method>_top1` to the run's TensorBoard log.
    """
    run_dir, method = Path(config.run.dir), config.method
    weights = run_dir / "classifier.pth"
    kwargs = classifier_kwargs(
        config.model.arch,
        config.data.img_size,
        config.model.patch,
        num_classes_of(config),
        config.finetune.pool,
    )
    frozen_unchanged = None
    if rank() == 0:
        state = consolidated_state_dict(run_dir / "ckpt", checkpoint.latest_tag(run_dir / "ckpt"))
        state = encoder_state(state)
        if method == "linprobe":
            with torch.random.fork_rng(devices=[]):
                # The encoder as the engine built it (the weights graft.init does not give).
                torch.manual_seed(config.run.seed)
                start = grafted_objective(config).encoder.state_dict()
            frozen_unchanged = frozen_weights_unchanged(state, start)
        save_atomic(OBJECTIVES[method].classifier_state(state), weights)
        weights.with_suffix(".json").write_text(json.dumps({"timm": kwargs}, indent=1) + "\n")
    if is_distributed():
        dist.barrier()
    model = timm.create_model(pretrained=False, **kwargs)  # what a user of classifier.pth does
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    from deepspeed.accelerator import get_accelerator  # deepspeed only where a classifier is measured

    device = torch.device(get_accelerator().current_device_name())
    model.to(device).eval()

    manifest = Manifest.load(config.finetune.val)
    correct, seen = top1_counts(
        [model],
        manifest,
        config.deepspeed.micro_batch_size,
        config.data.img_size,
        config.data.num_workers,
        device,
        bf16=config.deepspeed.precision != "fp32",
    )
    if int(seen) < manifest.num_samples and not config.finetune.allow_partial:
        raise UserError(
            f"finetune.val {config.finetune.val}: {int(seen)} of the {manifest.num_samples} images "
            "the manifest lists could be read (see the warnings above); the checkpoint stays — set "
            "finetune.allow_partial=true (lg-eval: --allow-partial) to score the rest"
        )
    history_file = run_dir / "val_history.json"
    history = (
        json.loads(history_file.read_text()) if config.finetune.eval_every and history_file.is_file() else []
    )
    best = best_record(history)
    result = {
        "protocol": config.linprobe.protocol if method == "linprobe" else "finetune",
        "method": method,
        "encoder": config.graft.init,
        "run_dir": str(run_dir),
        "arch": config.model.arch,
        "pool": config.finetune.pool,
        "layer": "last",
        "top1": round(100 * correct / seen, 2),
        "best": best,
        "history": history,
        "val_samples": int(seen),
        "steps": step,
        "classifier": str(weights),
        "classifier_best": str(run_dir / "classifier_best.pth")
        if best and config.finetune.keep_best
        else None,
        "train_subset": Manifest.load(config.data.train).subset or None,
        "frozen_unchanged": frozen_unchanged,
        "partial": int(seen) < manifest.num_samples,
    }
    if rank() == 0:
        (run_dir / f"eval_{method}.json").write_text(json.dumps(result, indent=1) + "\n")
        write_scalar(run_dir / "tb", f"eval/{method}_top1", result["top1"], step)
    return result


def frozen_weights_unchanged(trained, start):
    """True when every weight and statistic but the head's is bit-identical to the start's; an error
    naming the first that is not (MoCo v3's main_lincls sanity check)."""
    for key, value in start.items():
        if key.startswith("head."):
            continue
        if not torch.equal(trained[key].float(), value.float()):
            raise RuntimeError(
                f"the frozen weight {key} changed during linear probing: a bug, please report it"
            )
    return True


def write_scalar(log_dir, tag, value, step=0):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        writer.add_scalar(tag, value, step)
