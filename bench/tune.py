"""Choosing the toy settings without looking at val: candidates trained on part of the train split and
measured on the rest.

    python -m bench.tune [--steps 300] [--seeds 0] [--only NAME ...] [--workdir runs/tune]

The embedded digits' train split (15 shards) is cut by shard into `tune_train` (the first 12, ~1,200
images: the pretraining data and the labelled kNN / linear-probe references) and `tune_val` (the
last 3, ~240 images: what the candidates are scored on). The val split is never read. Each candidate
is an lg-pretrain run (2 CPU processes, ViT-Tiny/8 at 32 px) with the kNN monitor on tune_val every
tenth of the run; the table shows its kNN curve, the final kNN and 10-shot linear probe (class token
and mean patch token), the representation measures of its last logged step (repr/*, from the
two-view methods), and its wall time. Prints the table and a JSON line, writes WORKDIR/results.json.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.photos import cpu_count
from bench.reproduce import MICRO_BATCH, PROCESSES, SHOTS
from pretrain import demo
from pretrain.data.manifest import Manifest
from pretrain.evaluation.features import encoder_from, frozen_scores
from pretrain.models import create_encoder

HELD_OUT_SHARDS = 3
# Digit-friendly views: a crop that keeps most of the digit, no flip (a mirrored digit is another
# digit, or none), brightness / contrast jitter only (the images are grey), no blur or solarize
# (an 8x8 scan upscaled to 32 px has nothing finer to lose).
DIGITS = {
    "min_scale": 0.4,
    "flip": False,
    "jitter": [0.4, 0.4, 0.0, 0.0],
    "grayscale_p": 0.0,
    "blur_p": 0.0,
    "solarize_p": 0.0,
}


def views(section, names, **changes):
    """Overrides that set every field of `DIGITS` (with `changes`) in each named view of a section."""
    settings = {**DIGITS, **changes}
    return [
        f"{section}.{name}.{key}={json.dumps(value)}" for name in names for key, value in settings.items()
    ]


MOCO = ["graft.rule=none", "graft.init="]
AVG = ["model.global_pool=avg", "run.knn_pool=mean"]  # the heads (and the monitor) read the mean patch token
MOCO_DIGITS = MOCO + views("moco", ["view1", "view2"])
CANDIDATES = {
    # name: (config, overrides)
    "mocov3_recipe": ("graft_demo.yaml", MOCO),
    "mocov3_digits": ("graft_demo.yaml", MOCO_DIGITS),
    "mae": ("demo.yaml", []),
    # The chosen settings, as committed in the toy configs:
    "final_mocov3": ("mocov3_demo.yaml", []),
    "final_simclr": ("simclr_demo.yaml", []),
    "final_byol": ("byol_demo.yaml", []),
    "final_simsiam": ("simsiam_demo.yaml", []),
}
# One change at a time from MoCo v3 with the digit views, then combinations of what helped.
MOCO_CHANGES = {
    "m0.9": ["moco.momentum=0.9"],
    "m0.8": ["moco.momentum=0.8"],
    "m0.95": ["moco.momentum=0.95"],
    "m0.9_lr2e-3": ["moco.momentum=0.9", "optim.base_lr=2e-3"],
    "m0.9_lr1e-2": ["moco.momentum=0.9", "optim.base_lr=1e-2"],
    "m0.9_t0.1": ["moco.momentum=0.9", "moco.temperature=0.1"],
    "m0.9_t0.5": ["moco.momentum=0.9", "moco.temperature=0.5"],
    "m0.9_crop0.2": ["moco.momentum=0.9", *views("moco", ["view1", "view2"], min_scale=0.2)],
    "m0.9_crop0.6": ["moco.momentum=0.9", *views("moco", ["view1", "view2"], min_scale=0.6)],
    "m0.9_blur": [
        "moco.momentum=0.9",
        *views("moco", ["view1"], blur_p=1.0),
        *views("moco", ["view2"], blur_p=0.1),
    ],
    "m0.9_patch_trained": ["moco.momentum=0.9", "moco.freeze_patch_embed=false"],
    "m0.9_betas0.95": ["moco.momentum=0.9", "optim.betas=[0.9,0.95]"],
    "m0.9_warmup0": ["moco.momentum=0.9", "optim.warmup_epochs=0"],
    "m0.9_warmup30": ["moco.momentum=0.9", "optim.warmup_epochs=1.1"],
    "m0.9_heads1024": ["moco.momentum=0.9", "moco.mlp_dim=1024", "moco.out_dim=256"],
    "m0.9_t0.3": ["moco.momentum=0.9", "moco.temperature=0.3"],
    "m0.9_wd0": ["moco.momentum=0.9", "optim.weight_decay=0"],
    "m0.9_bs32": ["moco.momentum=0.9", "deepspeed.micro_batch_size=16"],
    "m0.9_heads1024_bf16": [
        "moco.momentum=0.9",
        "moco.mlp_dim=1024",
        "moco.out_dim=256",
        "deepspeed.precision=bf16",
    ],
    "m0.9_avg": ["moco.momentum=0.9", *AVG],
    "m0.9_avg_lr1e-2": ["moco.momentum=0.9", *AVG, "optim.base_lr=1e-2"],
    "m0.9_avg_crop0.6": ["moco.momentum=0.9", *AVG, *views("moco", ["view1", "view2"], min_scale=0.6)],
    "m0.9_avg_bs128": ["moco.momentum=0.9", *AVG, "deepspeed.grad_accum=2"],
}
CANDIDATES.update(
    {
        f"mocov3_digits_{name}": ("graft_demo.yaml", MOCO_DIGITS + change)
        for name, change in MOCO_CHANGES.items()
    }
)
# The other contrastive methods: their recipe views, the digit views, then momentum / temperature / lr.
OTHERS = {
    "simclr": (
        "simclr_demo.yaml",
        views("simclr", ["view"]),
        {
            "t0.2": ["simclr.temperature=0.2"],
            "t0.5": ["simclr.temperature=0.5"],
            "lr5e-3": ["optim.base_lr=5e-3"],
            "lr5e-4": ["optim.base_lr=5e-4"],
            "avg": AVG,
            "avg_t0.2": [*AVG, "simclr.temperature=0.2"],
            "lr5e-3_t0.2": ["optim.base_lr=5e-3", "simclr.temperature=0.2"],
            "lr1e-2_t0.2": ["optim.base_lr=1e-2", "simclr.temperature=0.2"],
        },
    ),
    "byol": (
        "byol_demo.yaml",
        views("byol", ["view1", "view2"]),
        {
            "m0.9": ["byol.momentum=0.9"],
            "m0.99": ["byol.momentum=0.99"],
            "m0.9_lr5e-3": ["byol.momentum=0.9", "optim.base_lr=5e-3"],
            "m0.9_avg": ["byol.momentum=0.9", *AVG],
        },
    ),
    "simsiam": (
        "simsiam_demo.yaml",
        views("simsiam", ["view"]),
        {
            "lr2e-3": ["optim.base_lr=2e-3"],
            "lr3e-2": ["optim.base_lr=3e-2"],
            "avg": AVG,
            "lr5e-4": ["optim.base_lr=5e-4"],
            "lr1e-3": ["optim.base_lr=1e-3"],
        },
    ),
}
for method, (config, digit_views, changes) in OTHERS.items():
    CANDIDATES[f"{method}_recipe"] = (config, [])
    CANDIDATES[f"{method}_digits"] = (config, digit_views)
    CANDIDATES.update(
        {f"{method}_digits_{name}": (config, digit_views + change) for name, change in changes.items()}
    )


def split_train(shards):
    """Write tune_train.json and tune_val.json beside the train manifest (shards, not copies)."""
    manifest = Manifest.load(shards / "train.json")
    parts = {"tune_train": manifest.shards[:-HELD_OUT_SHARDS], "tune_val": manifest.shards[-HELD_OUT_SHARDS:]}
    for name, part in parts.items():
        Manifest(
            split=name,
            classes=manifest.classes,
            num_samples=sum(s.num_samples for s in part),
            shards=part,
            fingerprint=manifest.fingerprint,
        ).save(shards / f"{name}.json")
    return {name: shards / f"{name}.json" for name in parts}


def run(name, seed, steps, workdir, manifests, precision="fp32"):
    config, overrides = CANDIDATES[name]
    run_dir = workdir / f"{name}_seed{seed}"
    images = Manifest.load(manifests["tune_train"]).num_samples
    micro_batch = next(
        (int(o.split("=")[1]) for o in overrides if o.startswith("deepspeed.micro_batch_size=")), MICRO_BATCH
    )
    epochs = steps / (images // (PROCESSES * micro_batch))
    common = [
        f"run.seed={seed}",
        f"run.max_steps={steps}",
        f"run.log_every={max(1, steps // 10)}",
        f"run.save_every={steps}",
        "run.image_every=0",
        "model.patch_size=8",
        f"deepspeed.micro_batch_size={MICRO_BATCH}",
        "deepspeed.config=ds_configs/zero2.json",
        f"deepspeed.precision={precision}",
        f"optim.epochs={epochs}",
        f"optim.warmup_epochs={epochs / 10}",
        f"run.knn_every={max(1, steps // 10)}",
        f"data.knn_train={manifests['tune_train']}",
        f"data.knn_val={manifests['tune_val']}",
    ]
    started = time.perf_counter()
    demo.pretrain(config, run_dir, manifests["tune_train"], PROCESSES, *common, *overrides, echo=False)
    return run_dir, time.perf_counter() - started


def score(encoder, manifests):
    scores = frozen_scores(
        encoder, manifests["tune_train"], manifests["tune_val"], 32, ("token", "mean"), SHOTS
    )
    return {
        "knn_token": scores["knn_token"],
        "few_token": scores[f"linear{SHOTS}shot_token"],
        "knn_mean": scores["knn_mean"],
        "few_mean": scores[f"linear{SHOTS}shot_mean"],
    }


def scalar_values(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def last_logged(run_dir, tag):
    try:
        return scalar_values(run_dir, tag)[-1]
    except KeyError:
        return float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--only", nargs="+", choices=sorted(CANDIDATES), help="candidates to run (default: all)"
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--workdir", type=Path, default=Path("runs/tune"))
    args = parser.parse_args(argv)
    shards = demo.prepare_data(args.workdir / "data")
    manifests = split_train(shards)
    rows = {}
    torch.manual_seed(0)
    rows["random"] = [
        {**score(create_encoder("vit_tiny", 32, 8).eval(), manifests), "seconds": 0.0, "curve": []}
    ]
    for name in args.only or CANDIDATES:
        rows[name] = []
        for seed in args.seeds:
            run_dir, seconds = run(name, seed, args.steps, args.workdir, manifests, args.precision)
            row = {
                **score(encoder_from(run_dir, "vit_tiny", 32, 8), manifests),
                "seconds": round(seconds, 1),
                "curve": [round(v, 1) for v in scalar_values(run_dir, "eval/knn_top1")],
                **{
                    tag: round(last_logged(run_dir, f"repr/{tag}"), 3)
                    for tag in ("pair_top1", "alignment", "uniformity", "std")
                },
            }
            rows[name].append(row)
            print(f"{name} seed {seed}: " + "  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    metrics = (
        "knn_token",
        "few_token",
        "knn_mean",
        "few_mean",
        "pair_top1",
        "alignment",
        "uniformity",
        "std",
    )
    print(
        f"\n{args.steps} steps ({args.precision}), seeds {args.seeds}, "
        f"held-out {HELD_OUT_SHARDS} train shards, "
        f"{cpu_count()} CPUs"
    )
    print(f"{'candidate':24s}" + "".join(f"{m:>11s}" for m in metrics) + f"{'min':>6s}  kNN curve (token)")
    summary = {}
    for name, runs in rows.items():
        summary[name] = {m: round(statistics.mean(r.get(m, float("nan")) for r in runs), 3) for m in metrics}
        cells = "".join(f"{summary[name][m]:11.2f}" for m in metrics)
        print(f"{name:24s}{cells}{sum(r['seconds'] for r in runs) / 60:6.1f}  {runs[0]['curve']}")
    record = {
        "bench": "tune",
        "steps": args.steps,
        "precision": args.precision,
        "seeds": args.seeds,
        "summary": summary,
        "runs": rows,
    }
    (args.workdir / "results.json").write_text(json.dumps(record, indent=1))
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
