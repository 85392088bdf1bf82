"""Toy reproduction of seed 001's comparison: MAE, MoCo v3, MTL, CL->MIM and MIM->CL.

    python -m bench.reproduce [--steps 90] [--seeds 0 1 2] [--workdir runs/reproduce]

On the embedded digits (1,438 train / 359 val images, 32 px), a ViT-Tiny with 8-px patches trained by
lg-pretrain on 2 CPU processes (DeepSpeed ZeRO-2, gloo), every training stage the same number of steps
with its schedule run to the end:

* MAE: configs/demo.yaml; MoCo v3: configs/graft_demo.yaml without grafting; MTL: configs/hybrid_demo.yaml
  (lambda 0.5);
* MIM->CL: MoCo v3 started from that seed's MAE run, blocks 0-7 at a tenth of the lr (rule list, the
  official recipe); CL->MIM: MAE started from that seed's MoCo v3 run, the same rule. The grafted
  models have had two stages (2x the steps of the others), as in the paper.

Each encoder (and, as the floor, the same ViT untrained) is then frozen and evaluated on the val split:
weighted kNN (k 20, T 0.07) and a linear probe (BatchNorm + linear) with all labels and with 10 per
class (the paper's 1 % setting at toy scale), on the mean patch token and on the class token. Prints a
table (mean +- std over seeds, beside seed 001's ViT-B / ImageNet linear-probe numbers) and a JSON line;
writes WORKDIR/results.json. Runs resume: a finished run is only evaluated again.
"""
import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench.photos import cpu_count
from pretrain import demo
from pretrain.eval import encoder_from, extract_features, knn_accuracy, linear_probe_accuracy
from pretrain.models import create_encoder

TRAIN_IMAGES = 1438
PROCESSES, MICRO_BATCH = 2, 32
SHOTS = 10  # labelled images per class for the few-shot linear probe
# name: (config, overrides, the run it starts from)
RUNS = {
    "mae": ("demo.yaml", [], None),
    "mocov3": ("graft_demo.yaml", ["graft.rule=none", "graft.init="], None),
    "mtl": ("hybrid_demo.yaml", ["run.diagnostics_every=0"], None),
    "cl2mim": ("demo.yaml", ["graft.rule=list", "graft.scales=[0.1,0.1,1.0]"], "mocov3"),
    "mim2cl": ("graft_demo.yaml", [], "mae"),
}
PAPER_LINEAR = {"random": float("nan"), "mae": 68.0, "mocov3": 76.7, "mtl": 68.4, "cl2mim": 65.5, "mim2cl": 74.5}  # seed 001, ViT-B IN-1k
NAMES = {"random": "random init", "mae": "MAE", "mocov3": "MoCo v3", "mtl": "MTL (hybrid)", "cl2mim": "CL->MIM", "mim2cl": "MIM->CL"}


def train(name, seed, steps, workdir, shards):
    config, overrides, start = RUNS[name]
    run_dir = workdir / f"{name}_seed{seed}"
    steps_per_epoch = TRAIN_IMAGES // (PROCESSES * MICRO_BATCH)
    epochs = steps / steps_per_epoch
    common = [f"run.seed={seed}", f"run.max_steps={steps}", f"run.log_every={max(1, steps // 5)}",
              f"run.save_every={steps}", "run.image_every=0", "model.patch_size=8",
              f"deepspeed.micro_batch_size={MICRO_BATCH}", "deepspeed.config=ds_configs/zero2.json",
              "deepspeed.precision=fp32", f"optim.epochs={epochs}", f"optim.warmup_epochs={epochs / 10}"]
    if start:
        common.append(f"graft.init={workdir / f'{start}_seed{seed}'}")
    started = time.perf_counter()
    demo.pretrain(config, run_dir, shards / "train.json", PROCESSES, *overrides, *common, echo=False)
    return run_dir, time.perf_counter() - started


def evaluate(encoder, shards):
    scores = {}
    (train, train_y), (val, val_y) = (extract_features(encoder, shards / f"{split}.json", 32, ("mean", "token"))
                                      for split in ("train", "val"))
    for pool in ("mean", "token"):
        train_f, val_f = train[pool, -1], val[pool, -1]
        scores[f"knn_{pool}"] = 100 * knn_accuracy(train_f, train_y, val_f, val_y)
        scores[f"linear_{pool}"] = 100 * linear_probe_accuracy(train_f, train_y, val_f, val_y)
        few = few_shot(train_y, SHOTS)
        scores[f"linear{SHOTS}shot_{pool}"] = 100 * linear_probe_accuracy(train_f[few], train_y[few], val_f, val_y)
    return scores


def few_shot(labels, shots):
    """The first `shots` training images of every class (the paper's 1 % setting, at toy scale)."""
    return torch.cat([(labels == c).nonzero().flatten()[:shots] for c in labels.unique()])


def summary(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=90, help="training steps per stage (22 per epoch)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("runs/reproduce"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    shards = demo.prepare_data(args.workdir / "data")
    results = {name: [] for name in ["random", *RUNS]}
    for seed in args.seeds:
        torch.manual_seed(seed)  # the floor: the same encoder untrained
        scores = evaluate(create_encoder("vit_tiny", 32, 8).eval(), shards)
        results["random"].append({"seed": seed, "train_s": 0.0, **{k: round(v, 2) for k, v in scores.items()}})
        for name in RUNS:  # in order: the grafted runs start from this seed's MAE and MoCo v3 runs
            run_dir, seconds = train(name, seed, args.steps, args.workdir, shards)
            scores = evaluate(encoder_from(run_dir, "vit_tiny", 32, 8), shards)
            results[name].append({"seed": seed, "train_s": round(seconds, 1), **{k: round(v, 2) for k, v in scores.items()}})
            print(f"seed {seed} {NAMES[name]:13s} " + "  ".join(f"{k} {v:5.1f}" for k, v in scores.items())
                  + f"  ({seconds:.0f} s)", flush=True)
    total = time.perf_counter() - started

    metrics = ("knn_mean", "linear_mean", f"linear{SHOTS}shot_mean", "knn_token", "linear_token",
               f"linear{SHOTS}shot_token")
    print(f"\n{len(args.seeds)} seeds, {args.steps} steps per stage, ViT-Tiny/8 at 32 px, {PROCESSES} CPU processes, "
          f"{total / 60:.1f} min")
    print(f"{'method':14s}" + "".join(f"{m:>20s}" for m in metrics) + f"{'seed 001 linear':>17s}")
    table = {}
    for name, rows in results.items():
        table[name] = {m: summary([row[m] for row in rows]) for m in metrics}
        cells = "".join(f"{mean:13.1f} ± {std:4.1f}" for mean, std in table[name].values())
        print(f"{NAMES[name]:14s}{cells}{PAPER_LINEAR[name]:17.1f}")
    record = {"bench": "reproduce", "steps": args.steps, "seeds": args.seeds, "minutes": round(total / 60, 1),
              "cpus": cpu_count(), "machine": platform.processor() or platform.machine(),
              "mean_std": {name: {m: [round(v, 2) for v in ms] for m, ms in t.items()} for name, t in table.items()},
              "runs": results, "paper_linear": PAPER_LINEAR}
    (args.workdir / "results.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0



if __name__ == "__main__":
    raise SystemExit(main())
