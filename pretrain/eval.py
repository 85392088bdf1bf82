"""lg-eval: evaluation of a pretrained encoder on the sharded splits: weighted kNN and linear probes on
frozen features, and full fine-tuning.

    lg-eval knn      ENCODER --train TRAIN.json --val VAL.json [--pool token|mean] [--layer i]
    lg-eval linear   ENCODER --train TRAIN.json --val VAL.json [--fraction 0.01] [--epochs 300]
    lg-eval linear   ENCODER --train TRAIN.json --val VAL.json --protocol mae|mocov3 [--config C]
                     [key=value ...]
    lg-eval finetune ENCODER --train TRAIN.json --val VAL.json [--config configs/finetune_vit_b.yaml]
                     [key=value ...]

ENCODER: a run directory, an lg-export .pth (its .json beside it says the architecture), or a release
file (`{'model': ...}`, MoCo-style prefixes; give --arch, --img-size, --patch-size). Prints and writes a
JSON result (--out, default beside the encoder), and the accuracy as a TensorBoard scalar (--tb).

* `encoder_from(source, arch, img_size, patch)`: a timm encoder with the weights of a run directory,
  an lg-export file or an official release file (read as grafting reads them).
* `extract_features`: one pass over a split in epoch mode (every image once, eval view): the class
  token (`pool="token"`) and/or mean patch token (`pool="mean"`) of any blocks.
* `knn_accuracy` (pretrain.evaluation.knn): weighted kNN as in InstDisc / DINO: cosine similarity, k = 20
  neighbours voting with exp(sim / 0.07).
* `linear_probe_accuracy` (linear --protocol cached, the default): MAE's probe head on cached, un-augmented
  features (BatchNorm without affine parameters, then a linear layer), trained full-batch with AdamW:
  fast and a good monitor, not the papers' protocol.
* linear --protocol mae|mocov3 and finetune: training runs of `method: linprobe` (MAE's main_linprobe /
  MoCo v3's main_lincls; pretrain/methods/linprobe.py) and `method: finetune` (MAE's main_finetune;
  pretrain/methods/finetune.py) by the pretraining engine, so DeepSpeed, checkpoints, resumption and
  launchers are the same; run them under torchrun for several processes, or as `lg-submit --config
  configs/linprobe_mae_vit_b.yaml graft.init=... finetune.val=...` on Slurm. `supervised_result` then
  measures the last checkpoint on the val split (every rank its share of the shards) and writes
  RUN_DIR/eval_<method>.json (with the best of the measurements every finetune.eval_every epochs),
  RUN_DIR/classifier.pth and `eval/<method>_top1`.
"""

import argparse
import json
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.core.distributed import rank
from pretrain.core.errors import UserError, check_manifest, check_writable, cli_entry
from pretrain.core.shipped import shipped_root
from pretrain.data.manifest import Manifest
from pretrain.evaluation.features import (
    architecture,
    encoder_from,
    extract_features,
    linear_probe_accuracy,
    subset,
)
from pretrain.evaluation.knn import knn_accuracy
from pretrain.evaluation.supervised import write_scalar
from pretrain.models import TIMM_NAMES
from pretrain.train import run


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lg-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=["knn", "linear", "finetune"])
    parser.add_argument("encoder", type=Path, help="run directory, lg-export .pth or release checkpoint")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="finetune, linear --protocol mae|mocov3: run config overrides",
    )
    parser.add_argument(
        "--protocol",
        dest="linear_protocol",
        choices=["cached", "mae", "mocov3"],
        default="cached",
        help="linear: cached (a full-batch fit on cached features, fast; the default), or MAE's / "
        "MoCo v3's protocol trained by the engine on augmented images",
    )
    parser.add_argument("--train", type=Path, required=True, help="train manifest written by lg-shard")
    parser.add_argument("--val", type=Path, required=True, help="val manifest written by lg-shard")
    parser.add_argument(
        "--pool",
        choices=["token", "mean"],
        help="class token or mean patch token (default: token; finetune: the config's finetune.pool)",
    )
    parser.add_argument(
        "--layer", type=int, default=-1, help="features of block i (default: the last, normalized)"
    )
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument(
        "--fraction", type=float, default=1.0, help="linear: labelled fraction per class (0.01 = 1 %%)"
    )
    parser.add_argument("--epochs", type=int, default=300, help="linear: full-batch epochs")
    parser.add_argument("--lr", type=float, default=1e-2, help="linear: AdamW learning rate")
    parser.add_argument(
        "--config",
        type=Path,
        help="finetune / linear --protocol mae|mocov3: run config (default "
        "configs/finetune_vit_b.yaml, configs/linprobe_PROTOCOL_vit_b.yaml)",
    )
    parser.add_argument(
        "--run-dir",
        type=Path,
        help="finetune / linear --protocol mae|mocov3: run directory "
        "(default: ENCODER/finetune or ENCODER/linprobe_PROTOCOL for a run, else beside the file)",
    )
    parser.add_argument("--arch", choices=sorted(TIMM_NAMES))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="result JSON (default: beside the encoder)")
    parser.add_argument("--tb", type=Path, help="TensorBoard log directory for the result scalar")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument(
        "--allow-partial",
        action="store_true",
        help="score the images that could be read when "
        "a split has fewer than its manifest lists (stated in the JSON); an error otherwise",
    )
    args = parser.parse_intermixed_args(argv)
    # finetune and the papers' linear probes are training runs of the engine; knn and the cached probe are not
    args.trains = args.protocol == "finetune" or (
        args.protocol == "linear" and args.linear_protocol != "cached"
    )
    if args.overrides and not args.trains:
        parser.error(
            f"key=value overrides ({args.overrides[0]}) are for finetune and linear --protocol mae|mocov3"
        )
    if args.linear_protocol != "cached" and args.protocol != "linear":
        parser.error("--protocol is linear's")
    if args.trains and args.fraction != 1:
        parser.error(
            "--fraction is the cached probe's; for the engine protocols shard a label subset "
            "(lg-shard --subset-file / --subset-fraction) and give it as --train"
        )
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1] (0.01 = 1 %% of the labels)")
    return args


def default_config(args):
    """The run config of an engine protocol: --config, or the shipped ViT-B one for it."""
    if args.config:
        return args.config
    name = (
        "finetune_vit_b.yaml"
        if args.protocol == "finetune"
        else f"linprobe_{args.linear_protocol}_vit_b.yaml"
    )
    return shipped_root() / "configs" / name


def train_protocol(args, arch, img_size, patch_size):
    """lg-eval finetune / linear --protocol mae|mocov3: train a `method: finetune` / `linprobe` run from the
    encoder by the pretraining engine, then measure it on --val."""
    source, linear = args.encoder, args.protocol == "linear"
    name = f"linprobe_{args.linear_protocol}" if linear else "finetune"
    run_dir = args.run_dir or (
        source / name if source.is_dir() else source.with_name(f"{source.stem}_{name}")
    )
    settings = [
        f"method={'linprobe' if linear else 'finetune'}",
        f"graft.init={source.resolve()}",
        f"data.train={args.train}",
        f"finetune.val={args.val}",
        f"model.arch={arch}",
        f"data.img_size={img_size}",
        f"model.patch_size={patch_size}",
        f"run.dir={run_dir}",
    ]
    if linear:
        settings.append(f"linprobe.protocol={args.linear_protocol}")
    if args.pool:
        settings.append(f"finetune.pool={args.pool}")
    if args.allow_partial:
        settings.append("finetune.allow_partial=true")
    for path, what in ((args.out, "--out"), (args.tb / "probe" if args.tb else None, "--tb")):
        if path is not None:
            check_writable(path, what)
    config = load_config(default_config(args), settings + args.overrides)  # a run.dir=... override wins
    code = run(config)
    if code == 0 and rank() == 0:
        result = json.loads((Path(config.run.dir) / f"eval_{config.method}.json").read_text())
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")
        if args.tb:
            write_scalar(args.tb, f"eval/{config.method}_top1", result["top1"])
        print(json.dumps(result))
    return code


def result_path(args, layer):
    if args.out:
        return args.out
    beside = args.encoder if args.encoder.is_dir() else args.encoder.parent
    return beside / f"eval_{args.protocol}_{args.pool}_{layer}.json"


def check_complete(name, labels, manifest, allow_partial):
    """Features of fewer images than the manifest lists (a truncated or unreadable shard) give a score of
    another data set: an error unless --allow-partial, and stated in the result either way."""
    expected = Manifest.load(manifest).num_samples
    if len(labels) < expected and not allow_partial:
        raise UserError(
            f"--{name} {manifest}: {len(labels)} of the {expected} images the manifest lists could be "
            "read (see the warnings above; lg-verify names the damaged shards); pass --allow-partial to "
            "score the rest anyway"
        )
    return {"read": len(labels), "listed": expected}


@cli_entry("lg-eval")
def main(argv=None):
    args = parse_args(argv)
    args.train = check_manifest(args.train, "--train", "train")
    args.val = check_manifest(args.val, "--val", "val")
    arch, img_size, patch_size = architecture(args.encoder, args)
    if args.trains:
        return train_protocol(args, arch, img_size, patch_size)
    args.pool = args.pool or "token"
    layer = "last" if args.layer < 0 else f"block_{args.layer:02d}"
    out = result_path(args, layer)
    for path, what in ((out, "--out"), (args.tb / "probe" if args.tb else None, "--tb")):
        if path is not None:
            check_writable(path, what)
    encoder = encoder_from(args.encoder, arch, img_size, patch_size)
    if not -1 <= args.layer < len(encoder.blocks):
        raise UserError(f"--layer {args.layer}: the encoder has blocks 0-{len(encoder.blocks) - 1}")
    options = dict(
        pools=[args.pool],
        layers=[args.layer],
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=True,
    )
    train, train_y = extract_features(encoder, args.train, img_size, **options)
    val, val_y = extract_features(encoder, args.val, img_size, **options)
    read = {
        name: check_complete(name, labels, manifest, args.allow_partial)
        for name, labels, manifest in (("train", train_y, args.train), ("val", val_y, args.val))
    }
    train_f, val_f = train[args.pool, args.layer], val[args.pool, args.layer]
    if args.protocol == "knn":
        accuracy = knn_accuracy(train_f, train_y, val_f, val_y, args.k, args.temperature)
    else:
        chosen = subset(train_y, args.fraction) if args.fraction < 1 else torch.arange(len(train_y))
        accuracy = linear_probe_accuracy(train_f[chosen], train_y[chosen], val_f, val_y, args.epochs, args.lr)
    result = {
        "protocol": args.protocol,
        "encoder": str(args.encoder),
        "arch": arch,
        "pool": args.pool,
        "layer": layer,
        "top1": round(100 * accuracy, 2),
        "train_samples": len(train_y),
        "val_samples": len(val_y),
        "fraction": args.fraction if args.protocol == "linear" else None,
        "partial": any(r["read"] < r["listed"] for r in read.values()),
        "samples": read,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.tb:
        write_scalar(args.tb, f"eval/{args.protocol}_{args.pool}_{layer}_top1", result["top1"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
