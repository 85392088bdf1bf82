"""lg-eval: evaluation of a pretrained encoder on the sharded splits: weighted kNN and linear probes on
frozen features, and full fine-tuning.

    lg-eval knn      ENCODER --train TRAIN.json --val VAL.json [--pool token|mean] [--layer i]
    lg-eval linear   ENCODER --train TRAIN.json --val VAL.json [--fraction 0.01] [--epochs 300]
    lg-eval linear   ENCODER --train TRAIN.json --val VAL.json --protocol mae|mocov3 [--config C] [key=value ...]
    lg-eval finetune ENCODER --train TRAIN.json --val VAL.json [--config configs/finetune_vit_b.yaml] [key=value ...]

ENCODER: a run directory, an lg-export .pth (its .json beside it says the architecture), or a release
file (`{'model': ...}`, MoCo-style prefixes; give --arch, --img-size, --patch-size). Prints and writes a
JSON result (--out, default beside the encoder), and the accuracy as a TensorBoard scalar (--tb).

* `encoder_from(source, arch, img_size, patch)`: a timm encoder with the weights of a run directory,
  an lg-export file or an official release file (read as grafting reads them).
* `extract_features`: one pass over a split in epoch mode (every image once, eval view): the class
  token (`pool="token"`) and/or mean patch token (`pool="mean"`) of any blocks.
* `knn_accuracy` (pretrain.knn): weighted kNN as in InstDisc / DINO: cosine similarity, k = 20
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
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from data_prep.manifest import Manifest
from pretrain.analysis import block_tokens
from pretrain.config import load_config
from pretrain.data import make_loader
from pretrain.errors import UserError, check_manifest, check_writable, cli_entry
from pretrain.grafting import load_start_weights, read_state_dict
from pretrain.knn import knn_accuracy
from pretrain.models import TIMM_NAMES, create_encoder, pool_tokens
from pretrain.views import normalize

REPO = Path(__file__).resolve().parents[1]


def encoder_from(source, arch, img_size, patch_size):
    """The encoder of `source` in eval mode. A global-pool classifier (MAE's fine-tuned release files and
    our classifier.pth: `fc_norm` and no `norm`) keeps that layout: its "mean" features pass `fc_norm`."""
    encoder = create_encoder(arch, img_size, patch_size)
    state = read_state_dict(source)
    if "fc_norm.weight" in state and "norm.weight" not in state:
        encoder.norm, encoder.fc_norm = nn.Identity(), nn.LayerNorm(encoder.embed_dim, eps=1e-6)
    load_start_weights(encoder, source, state=state)
    return encoder.eval()


@torch.no_grad()
def extract_features(encoder, manifest, img_size, pools=("token",), layers=(-1,), batch_size=256, num_workers=1,
                     progress=False):
    """({(pool, layer): (N, D) features}, labels) of every image of a split, in shard order, in one pass.

    pool "token": the class token, "mean": the mean patch token; layer -1: the normalized output of the
    last block, i >= 0: the output of block i (before the final norm).
    """
    loader = make_loader(manifest, batch_size, view="eval", img_size=img_size, mode="epoch",
                         num_workers=num_workers, rank=0, world_size=1)
    features, labels = {(pool, layer): [] for pool in pools for layer in layers}, []
    batches = tqdm(loader.epoch(0), total=loader.num_batches(0), desc="features", unit="batch", disable=not progress)
    for batch in batches:
        with block_tokens(encoder) as per_block:
            last = encoder.forward_features(normalize(batch["images"]))
        kept = ~batch["replaced"]  # a sample that did not decode is left out, not scored as another's copy
        for (pool, layer), store in features.items():
            store.append(pool_tokens(encoder, last if layer < 0 else per_block[layer], pool).float()[kept])
        labels.append(batch["labels"][kept])
    return {key: torch.cat(store) for key, store in features.items()}, torch.cat(labels)


def linear_probe_accuracy(train_features, train_labels, val_features, val_labels, epochs=300, lr=1e-2,
                          weight_decay=0.0, seed=0):
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_features.shape[1], affine=False),
                         nn.Linear(train_features.shape[1], num_classes))
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=generator)
        head[1].bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(head(train_features), train_labels).backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        return (head(val_features).argmax(dim=1) == val_labels).float().mean().item()


def subset(labels, fraction, seed=0):
    """Indices of `fraction` of the samples of every class (at least one each), chosen by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        keep = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.cat(chosen)


def few_shot(labels, shots):
    """Indices of the first `shots` samples of every class, in split order (the few-shot probe's labels:
    10 per class is the papers' 1 % setting at the demo's scale)."""
    return torch.cat([(labels == c).nonzero().flatten()[:shots] for c in labels.unique()])


def frozen_scores(encoder, train_manifest, val_manifest, img_size, pools=("token",), shots=10):
    """Frozen-feature top-1 (%) on val of the last block's features, per pool: kNN (`knn_<pool>`), the
    linear probe with every label (`linear_<pool>`) and with `shots` per class (`linear<shots>shot_<pool>`)."""
    (train, train_y), (val, val_y) = (extract_features(encoder, manifest, img_size, pools)
                                      for manifest in (train_manifest, val_manifest))
    few, scores = few_shot(train_y, shots), {}
    for pool in pools:
        train_f, val_f = train[pool, -1], val[pool, -1]
        scores[f"knn_{pool}"] = 100 * knn_accuracy(train_f, train_y, val_f, val_y)
        scores[f"linear_{pool}"] = 100 * linear_probe_accuracy(train_f, train_y, val_f, val_y)
        scores[f"linear{shots}shot_{pool}"] = 100 * linear_probe_accuracy(train_f[few], train_y[few], val_f, val_y)
    return scores


def supervised_result(config, step):
    """Top-1 of a fine-tuning or linear-probe run `config` (its latest checkpoint) on finetune.val, as a
    result dict, with the best of its periodic measurements (finetune.eval_every) when there were any.

    Rank 0 consolidates the checkpoint into RUN_DIR/classifier.pth, a float32 timm state_dict that
    `timm.create_model(**classifier.json["timm"])` loads strictly (a linear probe's BatchNorm folded into the LayerNorm before
    its head); every rank then classifies its share of the val shards and the counts are summed. A linear
    probe's frozen weights are compared with graft.init's (`frozen_unchanged`; an error if they moved).
    Rank 0 writes RUN_DIR/eval_<method>.json and `eval/<method>_top1` to the run's TensorBoard log.
    """
    import timm
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pretrain import checkpoint
    from pretrain.distributed import is_distributed, rank
    from pretrain.export import consolidated_state_dict, save_atomic
    from pretrain.methods import OBJECTIVES, build_objective
    from pretrain.methods.finetune import num_classes_of
    from pretrain.models import classifier_kwargs
    from pretrain.validation import best_record, top1_counts

    run_dir, method = Path(config.run.dir), config.method
    weights = run_dir / "classifier.pth"
    kwargs = classifier_kwargs(config.model.arch, config.data.img_size, config.model.patch, num_classes_of(config),
                               config.finetune.pool)
    frozen_unchanged = None
    if rank() == 0:
        state = consolidated_state_dict(run_dir / "ckpt", checkpoint.latest_tag(run_dir / "ckpt"))
        state = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
        if method == "linprobe":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.run.seed)  # as the engine built it (weights graft.init does not give)
                start = build_objective(config).encoder.state_dict()
            frozen_unchanged = frozen_weights_unchanged(state, start)
        save_atomic(OBJECTIVES[method].classifier_state(state), weights)
        weights.with_suffix(".json").write_text(json.dumps({"timm": kwargs}, indent=1) + "\n")
    if is_distributed():
        dist.barrier()
    model = timm.create_model(pretrained=False, **kwargs)  # what a user of classifier.pth does
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    device = torch.device(get_accelerator().current_device_name())
    model.to(device).eval()

    manifest = Manifest.load(config.finetune.val)
    correct, seen = top1_counts([model], manifest, config.deepspeed.micro_batch_size, config.data.img_size,
                                config.data.num_workers, device, bf16=config.deepspeed.precision != "fp32")
    if int(seen) < manifest.num_samples and not config.finetune.allow_partial:
        raise UserError(f"finetune.val {config.finetune.val}: {int(seen)} of the {manifest.num_samples} images "
                        "the manifest lists could be read (see the warnings above); the checkpoint stays — set "
                        "finetune.allow_partial=true (lg-eval: --allow-partial) to score the rest")
    history_file = run_dir / "val_history.json"
    history = json.loads(history_file.read_text()) if config.finetune.eval_every and history_file.is_file() else []
    best = best_record(history)
    result = {"protocol": config.linprobe.protocol if method == "linprobe" else "finetune", "method": method,
              "encoder": config.graft.init, "run_dir": str(run_dir), "arch": config.model.arch,
              "pool": config.finetune.pool, "layer": "last", "top1": round(100 * correct / seen, 2),
              "best": best, "history": history, "val_samples": int(seen), "steps": step, "classifier": str(weights),
              "classifier_best": str(run_dir / "classifier_best.pth") if best and config.finetune.keep_best else None,
              "train_subset": Manifest.load(config.data.train).subset or None,
              "frozen_unchanged": frozen_unchanged, "partial": int(seen) < manifest.num_samples}
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
            raise RuntimeError(f"the frozen weight {key} changed during linear probing: a bug, please report it")
    return True


def write_scalar(log_dir, tag, value, step=0):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        writer.add_scalar(tag, value, step)


def architecture(source, args):
    """(arch, img_size, patch_size) of an encoder source: its run config, its lg-export .json, or flags."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        config = load_config(source / "config.yaml")
        return config.model.arch, config.data.img_size, config.model.patch
    info = source.with_suffix(".json")
    if source.is_file() and info.is_file():
        timm_kwargs = json.loads(info.read_text())["timm"]
        arch = {name: arch for arch, name in TIMM_NAMES.items()}[timm_kwargs["model_name"]]
        return arch, timm_kwargs["img_size"], timm_kwargs["patch_size"]
    if args.arch is None:
        raise UserError(f"{source}: give --arch (and --img-size, --patch-size): no run config or lg-export .json "
                        "says what architecture it is")
    return args.arch, args.img_size, args.patch_size or (14 if args.arch == "vit_huge" else 16)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lg-eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=["knn", "linear", "finetune"])
    parser.add_argument("encoder", type=Path, help="run directory, lg-export .pth or release checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="finetune, linear --protocol mae|mocov3: "
                        "run config overrides")
    parser.add_argument("--protocol", dest="linear_protocol", choices=["cached", "mae", "mocov3"], default="cached",
                        help="linear: cached (a full-batch fit on cached features, fast; the default), or MAE's / "
                        "MoCo v3's protocol trained by the engine on augmented images")
    parser.add_argument("--train", type=Path, required=True, help="train manifest written by lg-shard")
    parser.add_argument("--val", type=Path, required=True, help="val manifest written by lg-shard")
    parser.add_argument("--pool", choices=["token", "mean"], help="class token or mean patch token (default: "
                        "token; finetune: the config's finetune.pool)")
    parser.add_argument("--layer", type=int, default=-1, help="features of block i (default: the last, normalized)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--fraction", type=float, default=1.0, help="linear: labelled fraction per class (0.01 = 1 %%)")
    parser.add_argument("--epochs", type=int, default=300, help="linear: full-batch epochs")
    parser.add_argument("--lr", type=float, default=1e-2, help="linear: AdamW learning rate")
    parser.add_argument("--config", type=Path, help="finetune / linear --protocol mae|mocov3: run config (default "
                        "configs/finetune_vit_b.yaml, configs/linprobe_PROTOCOL_vit_b.yaml)")
    parser.add_argument("--run-dir", type=Path, help="finetune / linear --protocol mae|mocov3: run directory "
                        "(default: ENCODER/finetune or ENCODER/linprobe_PROTOCOL for a run, else beside the file)")
    parser.add_argument("--arch", choices=sorted(TIMM_NAMES))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, help="result JSON (default: beside the encoder)")
    parser.add_argument("--tb", type=Path, help="TensorBoard log directory for the result scalar")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    parser.add_argument("--allow-partial", action="store_true", help="score the images that could be read when "
                        "a split has fewer than its manifest lists (stated in the JSON); an error otherwise")
    args = parser.parse_intermixed_args(argv)
    # finetune and the papers' linear probes are training runs of the engine; knn and the cached probe are not
    args.trains = args.protocol == "finetune" or (args.protocol == "linear" and args.linear_protocol != "cached")
    if args.overrides and not args.trains:
        parser.error(f"key=value overrides ({args.overrides[0]}) are for finetune and linear --protocol mae|mocov3")
    if args.linear_protocol != "cached" and args.protocol != "linear":
        parser.error("--protocol is linear's")
    if args.trains and args.fraction != 1:
        parser.error("--fraction is the cached probe's; for the engine protocols shard a label subset "
                     "(lg-shard --subset-file / --subset-fraction) and give it as --train")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction {args.fraction}: must be in (0, 1] (0.01 = 1 %% of the labels)")
    return args


def default_config(args):
    """The run config of an engine protocol: --config, or the shipped ViT-B one for it."""
    if args.config:
        return args.config
    name = "finetune_vit_b.yaml" if args.protocol == "finetune" else f"linprobe_{args.linear_protocol}_vit_b.yaml"
    return REPO / "configs" / name


def train_protocol(args, arch, img_size, patch_size):
    """lg-eval finetune / linear --protocol mae|mocov3: train a `method: finetune` / `linprobe` run from the
    encoder by the pretraining engine, then measure it on --val."""
    from pretrain.distributed import rank
    from pretrain.train import run

    source, linear = args.encoder, args.protocol == "linear"
    name = f"linprobe_{args.linear_protocol}" if linear else "finetune"
    run_dir = args.run_dir or (source / name if source.is_dir() else source.with_name(f"{source.stem}_{name}"))
    settings = [f"method={'linprobe' if linear else 'finetune'}", f"graft.init={source.resolve()}",
                f"data.train={args.train}", f"finetune.val={args.val}", f"model.arch={arch}",
                f"data.img_size={img_size}", f"model.patch_size={patch_size}", f"run.dir={run_dir}"]
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
        raise UserError(f"--{name} {manifest}: {len(labels)} of the {expected} images the manifest lists could be "
                        "read (see the warnings above; lg-verify names the damaged shards); pass --allow-partial to "
                        "score the rest anyway")
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
    options = dict(pools=[args.pool], layers=[args.layer], batch_size=args.batch_size, num_workers=args.workers,
                   progress=True)
    train, train_y = extract_features(encoder, args.train, img_size, **options)
    val, val_y = extract_features(encoder, args.val, img_size, **options)
    read = {name: check_complete(name, labels, manifest, args.allow_partial)
            for name, labels, manifest in (("train", train_y, args.train), ("val", val_y, args.val))}
    train_f, val_f = train[args.pool, args.layer], val[args.pool, args.layer]
    if args.protocol == "knn":
        accuracy = knn_accuracy(train_f, train_y, val_f, val_y, args.k, args.temperature)
    else:
        chosen = subset(train_y, args.fraction) if args.fraction < 1 else torch.arange(len(train_y))
        accuracy = linear_probe_accuracy(train_f[chosen], train_y[chosen], val_f, val_y, args.epochs, args.lr)
    result = {"protocol": args.protocol, "encoder": str(args.encoder), "arch": arch, "pool": args.pool,
              "layer": layer, "top1": round(100 * accuracy, 2), "train_samples": len(train_y),
              "val_samples": len(val_y), "fraction": args.fraction if args.protocol == "linear" else None,
              "partial": any(r["read"] < r["listed"] for r in read.values()), "samples": read}
    out.write_text(json.dumps(result, indent=1) + "\n")
    if args.tb:
        write_scalar(args.tb, f"eval/{args.protocol}_{args.pool}_{layer}_top1", result["top1"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
