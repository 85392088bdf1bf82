"""lg-demo: the whole pipeline end to end on the embedded digits data set, on the CPU.

    python -m pretrain.demo [--workdir runs/demo] [--processes 2]

Steps: write the demo data set -> shard train and val -> verify the shards -> read them back through
the training loader (resampled, MAE view) and the evaluation loader (epoch mode) -> pretrain a ViT-Tiny
with MAE on 2 processes (DeepSpeed ZeRO-1 on gloo, configs/demo.yaml) -> train MoCo v3 from scratch as
the contrastive baseline (configs/mocov3_demo.yaml) and continue the MAE weights with layer-grafted
MoCo v3 (configs/graft_demo.yaml: the MAE weights in both encoders, blocks 0-7 at a tenth of the
learning rate) -> export the encoders as timm state_dicts -> kNN, linear-probe and 10-shot
linear-probe accuracy of each, as a table -> the kNN curves the online monitor logged during the
three trainings, as a PNG -> lg-analyze's per-layer plots of the three -> say where everything is.
Every step is idempotent: a second run reuses what the first one wrote, and the training resumes from
its last checkpoint.
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from pretrain import analysis, export
from pretrain.core import checkpoint
from pretrain.core.errors import UserError, cli_entry
from pretrain.core.shipped import shipped_root
from pretrain.data.loader import make_loader
from pretrain.evaluation.features import architecture, encoder_from, frozen_scores
from pretrain.evaluation.supervised import write_scalar
from pretrain.models import create_encoder

IMG_SIZE = 32


def read_back(manifest, batch_size, **options):
    """Iterate one epoch; return (batches, samples, label histogram, bad samples, image shapes, seconds)."""
    loader = make_loader(manifest, batch_size, img_size=IMG_SIZE, **options)
    started, samples, labels, shapes = time.perf_counter(), 0, collections.Counter(), set()
    for batch in loader.epoch(0):
        samples += len(batch["labels"])
        labels.update(batch["labels"].tolist())
        shapes.add(tuple(batch["images"].shape[1:]))
    return loader.num_batches(0), samples, labels, loader.bad_samples, shapes, time.perf_counter() - started


def pretrain(config, run_dir, train_manifest, processes, *overrides, echo=True):
    """Run lg-pretrain with `config` on `processes` CPU processes, echoing its progress lines."""
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        if processes > 1
        else []
    )
    command = [
        sys.executable,
        *launcher,
        "-m",
        "pretrain.train",
        "--config",
        str(shipped_root() / "configs" / config),
        f"run.dir={run_dir}",
        f"data.train={train_manifest}",
        *overrides,
    ]
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get(
            "TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")
        ),
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log_file:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in process.stdout:
            log_file.write(line)
            if echo and "lg-pretrain" in line:
                print("      " + line.rstrip().split(" lg-pretrain: ", 1)[-1], flush=True)
    if process.wait() != 0:
        raise UserError(f"pretraining failed (exit code {process.returncode}); see {run_dir / 'train.log'}")


def prepare_data(workdir):
    """Steps 1-3: the embedded data set, sharded and verified; returns the shard directory. The data_prep
    commands run as the user would run them (data_prep sits above pretrain: pretrain never imports it)."""
    images, shards = workdir / "digits", workdir / "shards"
    print("== 1. embedded data set ->", images)
    prep("demo_data", images)
    for split in ("train", "val"):
        print(f"== 2. shard {split} ->", shards)
        prep(
            "shard",
            images,
            shards,
            "--split",
            split,
            "--layout",
            "imagefolder",
            "--max-per-shard",
            "100",
            "--workers",
            "2",
        )
        print(f"== 3. verify {split}")
        prep("verify", shards, "--split", split, "--workers", "2")
    return shards


def prep(command, *args):
    """Run `python -m data_prep.COMMAND ARGS` in this terminal; a UserError when it fails."""
    result = subprocess.run([sys.executable, "-m", f"data_prep.{command}", *map(str, args)])
    if result.returncode != 0:
        raise UserError(f"data_prep.{command} failed (exit code {result.returncode}); see its output above")


@cli_entry("lg-demo")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="lg-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--processes", type=int, default=2, help="training processes (default 2)")
    args = parser.parse_args(argv)
    shards = prepare_data(args.workdir)

    print("== 4. read back through the loaders")
    for split, options in (
        ("train", dict(view="mae", mode="resampled", rank=0, world_size=1)),
        ("val", dict(view="eval", mode="epoch", rank=0, world_size=1)),
    ):
        manifest = shards / f"{split}.json"
        batches, samples, labels, bad, shapes, seconds = read_back(manifest, 64, num_workers=2, **options)
        histogram = " ".join(f"{label}:{count}" for label, count in sorted(labels.items()))
        print(
            f"{split:5s} {options['mode']:9s} view={options['view']:4s} {batches} batches, "
            f"{samples} samples, "
            f"images {sorted(shapes)} uint8, bad samples {bad}, {samples / seconds:.0f} img/s\n"
            f"      labels {histogram}"
        )
    runs = {
        "MAE": args.workdir / "mae",
        "MoCo v3": args.workdir / "mocov3",
        "MIM->CL": args.workdir / "graft",
    }
    knn = [
        "run.knn_every=20",
        f"data.knn_train={shards / 'train.json'}",
        f"data.knn_val={shards / 'val.json'}",
    ]
    print(f"== 5. MAE pretraining of a ViT-Tiny on {args.processes} processes -> {runs['MAE']}")
    pretrain("demo.yaml", runs["MAE"], shards / "train.json", args.processes, *knn)
    print(f"== 6. MoCo v3 from scratch, the contrastive baseline -> {runs['MoCo v3']}")
    pretrain("mocov3_demo.yaml", runs["MoCo v3"], shards / "train.json", args.processes, *knn)
    print(f"== 7. grafted MoCo v3 from the MAE weights, lower blocks at 0.1x the lr -> {runs['MIM->CL']}")
    pretrain(
        "graft_demo.yaml",
        runs["MIM->CL"],
        shards / "train.json",
        args.processes,
        f"graft.init={runs['MAE']}",
        *knn,
    )
    print("== 8. export the encoders")
    encoders = {name: run_dir / "encoder.pth" for name, run_dir in runs.items()}
    for run_dir, encoder in zip(runs.values(), encoders.values()):
        if not up_to_date(encoder, run_dir / "ckpt" / "latest"):
            export.export(run_dir, encoder)
        call = ", ".join(
            f"{k}={v!r}" for k, v in json.loads(encoder.with_suffix(".json").read_text())["timm"].items()
        )
        print(f"{encoder}: timm.create_model({call}) loads it strictly")
    results_file = args.workdir / "eval.json"
    print(f"== 9. frozen-feature evaluation: class token of the last block, val split -> {results_file}")
    if not up_to_date(results_file, *encoders.values()):
        results = evaluate(encoders, shards)
        results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(format_table(json.loads(results_file.read_text())))
    curves_file = args.workdir / "knn_curves.png"
    print(f"== 10. kNN top-1 on val during training (the online monitor) -> {curves_file}")
    if not up_to_date(curves_file, *encoders.values()):
        plot_knn_curves(runs, curves_file)
    analysis_dir = args.workdir / "analysis"
    print(f"== 11. per-layer analyses of the three encoders -> {analysis_dir}")
    if not up_to_date(analysis_dir / "results.json", *encoders.values()):
        analysis.main(
            [
                *map(str, encoders.values()),
                "--names",
                *encoders,
                "--val",
                str(shards / "val.json"),
                "--train",
                str(shards / "train.json"),
                "--out",
                str(analysis_dir),
                "--tb",
                str(analysis_dir / "tb"),
            ]
        )
    print(
        f"demo finished; everything is under {args.workdir}\n"
        f"accuracies: {results_file}\n"
        f"kNN curves: {curves_file}\n"
        f"plots: {', '.join(sorted(path.name for path in analysis_dir.glob('*.png')))} in {analysis_dir}\n"
        f"TensorBoard: tensorboard --logdir {args.workdir}  (runs mae/tb, mocov3/tb, graft/tb, analysis/tb)"
    )
    return 0


def up_to_date(output, *inputs):
    """`output` exists and is newer than every input (a step a second demo run can skip)."""
    return output.is_file() and all(output.stat().st_mtime >= path.stat().st_mtime for path in inputs)


SHOTS = 10  # labels per class of the few-shot probe (the papers' 1 % of ImageNet, at this scale)
COLUMNS = {"knn_top1": "kNN top-1", "linear_top1": "linear top-1", "linear10shot_top1": "10-shot linear"}


def evaluate(encoders, shards):
    """kNN (k 20, T 0.07), linear-probe and 10-shot linear-probe top-1 (%) of each exported encoder and
    of a random one, on the class token; also written to each run's TensorBoard log at its last step
    (`eval/final_<key>`; `eval/knn_top1` is the monitor's curve)."""
    arch, img_size, patch_size = architecture(next(iter(encoders.values())), None)
    torch.manual_seed(0)
    models = {"random init": create_encoder(arch, img_size, patch_size).eval()}
    models.update({name: encoder_from(path, arch, img_size, patch_size) for name, path in encoders.items()})
    results = {}
    for name, model in models.items():
        scores = frozen_scores(model, shards / "train.json", shards / "val.json", img_size, ("token",), SHOTS)
        results[name] = {key: round(scores[key.replace("_top1", "_token")], 2) for key in COLUMNS}
        if name in encoders:
            run_dir = encoders[name].parent
            step = checkpoint.run_state(run_dir / "ckpt")["step"]
            for key, value in results[name].items():
                write_scalar(run_dir / "tb", f"eval/final_{key}", value, step)
    return results


def format_table(results):
    lines = [f"{'encoder':<12}" + "".join(f"{title:>16}" for title in COLUMNS.values())]
    lines += [f"{name:<12}" + "".join(f"{r[key]:>15.1f}%" for key in COLUMNS) for name, r in results.items()]
    return "\n".join(lines)


def plot_knn_curves(runs, path):
    """One line per run: the kNN top-1 the monitor logged (eval/knn_top1) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, run_dir in runs.items():
        events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
        events.Reload()
        points = events.Scalars("eval/knn_top1") if "eval/knn_top1" in events.Tags()["scalars"] else []
        axes.plot([p.step for p in points], [p.value for p in points], marker="o", markersize=3, label=name)
    axes.set_xlabel("training step")
    axes.set_ylabel("kNN top-1 on val (%)")
    axes.set_title("online kNN monitor (k 20, T 0.07, class token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    raise SystemExit(main())
