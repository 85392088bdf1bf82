"""Toy reproduction of the papers' orderings: MAE, four contrastive methods, MTL, CL->MIM and MIM->CL.

    python -m bench.reproduce [--steps 150] [--seeds 0 1 2] [--precision bf16] [--workdir runs/reproduce]

On the embedded digits (1,438 train / 359 val images, 32 px), a ViT-Tiny with 8-px patches trained by
lg-pretrain on 2 CPU processes (DeepSpeed ZeRO-2, gloo, bf16: this CPU's AVX-512 bf16 matmuls make a
step ~1.5x faster than fp32 at the same held-out accuracy), every training stage the same number of
steps with its schedule run to the end. The toy configs (configs/*_demo.yaml, with digit-friendly views and
the settings bench/tune.py chose on a held-out part of the train split) are:

* MAE: demo.yaml; MoCo v3: mocov3_demo.yaml; SimCLR, BYOL, SimSiam: their *_demo.yaml; MTL:
  hybrid_demo.yaml (lambda 0.5);
* MIM->CL: graft_demo.yaml, MoCo v3 started from that seed's MAE run, blocks 0-7 at a tenth of the lr
  (rule list, the official recipe); CL->MIM: MAE started from that seed's MoCo v3 run, the same rule.
  The grafted models have had two stages (2x the steps of the others), as in the paper.

Each encoder (and, as the floor, the same ViT untrained) is then frozen and evaluated on the val split:
weighted kNN (k 20, T 0.07) and a linear probe (BatchNorm + linear) with all labels and with 10 per
class (the paper's 1 % setting at toy scale), on the class token and on the mean patch token; and
lg-analyze's attention measures on 64 val images (mean attention distance and attention NMI of the
last third of the blocks). Prints a table (mean +- std over seeds, beside seed 001's ViT-B / ImageNet
linear-probe numbers), the issue's targets as measured, and a JSON line; writes WORKDIR/results.json.
Runs resume: a finished run is only evaluated again.
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
from pretrain.analysis import held_out_batch
from pretrain.core import checkpoint
from pretrain.evaluation.features import encoder_from, frozen_scores
from pretrain.evaluation.measures import measure
from pretrain.models import create_encoder

TRAIN_IMAGES = 1438
PROCESSES, MICRO_BATCH = 2, 32
SHOTS = 10  # labelled images per class for the few-shot linear probe
ANALYSIS_IMAGES = 64
# name: (config, overrides, the run it starts from)
RUNS = {
    "mae": ("demo.yaml", [], None),
    "mocov3": ("mocov3_demo.yaml", [], None),
    "simclr": ("simclr_demo.yaml", [], None),
    "byol": ("byol_demo.yaml", [], None),
    "simsiam": ("simsiam_demo.yaml", [], None),
    "mtl": ("hybrid_demo.yaml", ["run.diagnostics_every=0"], None),
    "cl2mim": ("demo.yaml", ["graft.rule=list", "graft.scales=[0.1,0.1,1.0]"], "mocov3"),
    "mim2cl": ("graft_demo.yaml", [], "mae"),
}
CONTRASTIVE = ("mocov3", "simclr", "byol", "simsiam")
PAPER_LINEAR = {
    "mae": 68.0,
    "mocov3": 76.7,
    "mtl": 68.4,
    "cl2mim": 65.5,
    "mim2cl": 74.5,
}  # seed 001, ViT-B IN-1k
NAMES = {
    "random": "random init",
    "mae": "MAE",
    "mocov3": "MoCo v3",
    "simclr": "SimCLR",
    "byol": "BYOL",
    "simsiam": "SimSiam",
    "mtl": "MTL (hybrid)",
    "cl2mim": "CL->MIM",
    "mim2cl": "MIM->CL",
}
KNN, FEW = "knn_token", f"linear{SHOTS}shot_token"  # the columns the targets are judged on


def common_overrides(seed, steps, precision="bf16"):
    steps_per_epoch = TRAIN_IMAGES // (PROCESSES * MICRO_BATCH)
    epochs = steps / steps_per_epoch
    return [
        f"run.seed={seed}",
        f"run.max_steps={steps}",
        f"run.log_every={max(1, steps // 5)}",
        f"run.save_every={steps}",
        "run.image_every=0",
        "model.patch_size=8",
        f"deepspeed.micro_batch_size={MICRO_BATCH}",
        "deepspeed.config=ds_configs/zero2.json",
        f"deepspeed.precision={precision}",
        f"optim.epochs={epochs}",
        f"optim.warmup_epochs={epochs / 10}",
        "run.knn_every=0",
    ]


def train(name, seed, steps, workdir, shards, runs=RUNS, starts=None, precision="bf16"):
    """Train run `name` of `runs` for one seed in WORKDIR/NAME_seedS (resuming / skipping a finished one),
    started from the run it names in `starts` (default: WORKDIR); returns (run_dir, seconds)."""
    config, overrides, start = runs[name]
    run_dir = workdir / f"{name}_seed{seed}"
    timing = run_dir / "bench_train_s.json"  # the first training's wall time, kept for a rerun's table
    finished = (checkpoint.run_state(run_dir / "ckpt") or {}).get("step") == steps
    if finished and timing.is_file():
        return run_dir, json.loads(timing.read_text())["seconds"]
    common = common_overrides(seed, steps, precision)
    if start:
        common.append(f"graft.init={(starts or workdir) / f'{start}_seed{seed}'}")
    started = time.perf_counter()
    demo.pretrain(config, run_dir, shards / "train.json", PROCESSES, *overrides, *common, echo=False)
    seconds = time.perf_counter() - started
    timing.write_text(json.dumps({"seconds": round(seconds, 1)}))
    return run_dir, seconds


def evaluate(encoder, shards, analysis_images=None):
    scores = frozen_scores(encoder, shards / "train.json", shards / "val.json", 32, ("token", "mean"), SHOTS)
    if analysis_images is not None:
        measures, _ = measure(encoder, analysis_images, encoder.patch_embed.patch_size[0])
        last_third = slice(2 * len(encoder.blocks) // 3, None)
        scores["attn_distance_last_third"] = statistics.mean(measures["attention_distance_px"][last_third])
        scores["attn_nmi_last_third"] = statistics.mean(measures["attention_nmi"][last_third])
    return scores


def summary(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def targets(table):
    """The issue's targets, each as (claim, measured text, held)."""
    mean = lambda name, metric: table[name][metric][0]
    std = lambda name, metric: table[name][metric][1]
    rows = []
    for name in CONTRASTIVE:
        gain = mean(name, KNN) - mean("random", KNN)
        rows.append(
            (
                f"{NAMES[name]} kNN >= random + 10",
                f"{mean(name, KNN):.1f} vs {mean('random', KNN):.1f} ({gain:+.1f})",
                gain >= 10,
            )
        )
    for metric in (KNN, FEW):
        rows.append(
            (
                f"MoCo v3 > MAE on {metric}",
                f"{mean('mocov3', metric):.1f} vs {mean('mae', metric):.1f}",
                mean("mocov3", metric) > mean("mae", metric),
            )
        )
        for other in ("mtl", "cl2mim"):
            margin = std("mim2cl", metric) + std(other, metric)
            gain = mean("mim2cl", metric) - mean(other, metric)
            rows.append(
                (
                    f"MIM->CL > {NAMES[other]} on {metric} by > sum of std",
                    f"{mean('mim2cl', metric):.1f} vs {mean(other, metric):.1f} ({gain:+.1f}, std sum "
                    f"{margin:.1f})",
                    gain > margin,
                )
            )
    rows.append(
        (
            f"MIM->CL > MAE on {FEW}",
            f"{mean('mim2cl', FEW):.1f} vs {mean('mae', FEW):.1f}",
            mean("mim2cl", FEW) > mean("mae", FEW),
        )
    )
    for metric, sign, word in (
        ("attn_distance_last_third", 1, "larger"),
        ("attn_nmi_last_third", -1, "lower"),
    ):
        rows.append(
            (
                f"MoCo v3 {metric} {word} than MAE's",
                f"{mean('mocov3', metric):.2f} vs {mean('mae', metric):.2f}",
                sign * (mean("mocov3", metric) - mean("mae", metric)) > 0,
            )
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per stage (22 per epoch)")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--workdir", type=Path, default=Path("runs/reproduce"))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    shards = demo.prepare_data(args.workdir / "data")
    images = held_out_batch(shards / "val.json", ANALYSIS_IMAGES, 32)
    results = {name: [] for name in ["random", *RUNS]}
    for seed in args.seeds:
        torch.manual_seed(seed)  # the floor: the same encoder untrained
        scores = evaluate(create_encoder("vit_tiny", 32, 8).eval(), shards, images)
        results["random"].append(
            {"seed": seed, "train_s": 0.0, **{k: round(v, 3) for k, v in scores.items()}}
        )
        for name in RUNS:  # in order: the grafted runs start from this seed's MAE and MoCo v3 runs
            run_dir, seconds = train(name, seed, args.steps, args.workdir, shards, precision=args.precision)
            scores = evaluate(encoder_from(run_dir, "vit_tiny", 32, 8), shards, images)
            results[name].append(
                {"seed": seed, "train_s": round(seconds, 1), **{k: round(v, 3) for k, v in scores.items()}}
            )
            print(
                f"seed {seed} {NAMES[name]:13s} "
                + "  ".join(f"{k} {v:5.2f}" for k, v in scores.items())
                + f"  ({seconds:.0f} s)",
                flush=True,
            )
    total = time.perf_counter() - started

    metrics = (
        "knn_token",
        f"linear{SHOTS}shot_token",
        "linear_token",
        "knn_mean",
        f"linear{SHOTS}shot_mean",
        "linear_mean",
        "attn_distance_last_third",
        "attn_nmi_last_third",
    )
    print(
        f"\n{len(args.seeds)} seeds, {args.steps} steps per stage ({args.precision}), ViT-Tiny/8 at 32 px, "
        f"{PROCESSES} CPU processes, "
        f"{total / 60:.1f} min"
    )
    print(f"{'method':14s}" + "".join(f"{m:>26s}" for m in metrics) + f"{'seed 001 linear':>17s}")
    table = {}
    for name, rows in results.items():
        table[name] = {m: summary([row[m] for row in rows]) for m in metrics}
        cells = "".join(f"{mean:19.2f} ± {std:4.2f}" for mean, std in table[name].values())
        print(f"{NAMES[name]:14s}{cells}{PAPER_LINEAR.get(name, float('nan')):17.1f}")
    checks = targets(table)
    print("\ntargets:")
    for claim, measured, held in checks:
        print(f"  {'met    ' if held else 'NOT met'}  {claim}: {measured}")
    record = {
        "bench": "reproduce",
        "steps": args.steps,
        "precision": args.precision,
        "seeds": args.seeds,
        "minutes": round(total / 60, 1),
        "cpus": cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "mean_std": {
            name: {m: [round(v, 3) for v in ms] for m, ms in t.items()} for name, t in table.items()
        },
        "targets": [{"claim": c, "measured": m, "met": h} for c, m, h in checks],
        "runs": results,
        "paper_linear": PAPER_LINEAR,
    }
    (args.workdir / "results.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
