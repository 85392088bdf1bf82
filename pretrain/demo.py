"""lg-demo: the whole pipeline end to end on the embedded digits data set, on the CPU.

    python -m pretrain.demo [--workdir runs/demo] [--processes 2]

Steps: write the demo data set -> shard train and val -> verify the shards -> read them back through
the training loader (resampled, MAE view) and the evaluation loader (epoch mode) -> pretrain a ViT-Tiny
with MAE on 2 processes (DeepSpeed ZeRO-1 on gloo, configs/demo.yaml) -> continue it with layer-grafted
MoCo v3 (configs/graft_demo.yaml: the MAE weights in both encoders, blocks 0-7 at a tenth of the
learning rate) -> export both encoders as timm state_dicts -> say where the TensorBoard logs are. Every step is idempotent: a second run reuses what
the first one wrote, and the training resumes from its last checkpoint.
"""
import argparse
import collections
import os
import subprocess
import sys
import time
from pathlib import Path

from data_prep import demo_data, shard, verify
from pretrain import export
from pretrain.data import make_loader
from pretrain.errors import UserError, cli_entry

IMG_SIZE = 32
REPO = Path(__file__).resolve().parents[1]


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
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "pretrain.train", "--config", str(REPO / "configs" / config),
               f"run.dir={run_dir}", f"data.train={train_manifest}", *overrides]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log_file:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        for line in process.stdout:
            log_file.write(line)
            if echo and "lg-pretrain" in line:
                print("      " + line.rstrip().split(" lg-pretrain: ", 1)[-1], flush=True)
    if process.wait() != 0:
        raise UserError(f"pretraining failed (exit code {process.returncode}); see {run_dir / 'train.log'}")


def prepare_data(workdir):
    """Steps 1-3: the embedded data set, sharded and verified; returns the shard directory."""
    images, shards = workdir / "digits", workdir / "shards"
    print("== 1. embedded data set ->", images)
    demo_data.main([str(images)])
    for split in ("train", "val"):
        print(f"== 2. shard {split} ->", shards)
        shard.main([str(images), str(shards), "--split", split, "--layout", "imagefolder",
                    "--max-per-shard", "100", "--workers", "2"])
        print(f"== 3. verify {split}")
        if verify.main([str(shards), "--split", split, "--workers", "2"]) != 0:
            raise UserError(f"lg-verify found problems in {shards}")
    return shards


@cli_entry("lg-demo")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="lg-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--processes", type=int, default=2, help="training processes (default 2)")
    args = parser.parse_args(argv)
    shards = prepare_data(args.workdir)

    print("== 4. read back through the loaders")
    for split, options in (("train", dict(view="mae", mode="resampled", rank=0, world_size=1)),
                           ("val", dict(view="eval", mode="epoch", rank=0, world_size=1))):
        manifest = shards / f"{split}.json"
        batches, samples, labels, bad, shapes, seconds = read_back(manifest, 64, num_workers=2, **options)
        histogram = " ".join(f"{label}:{count}" for label, count in sorted(labels.items()))
        print(f"{split:5s} {options['mode']:9s} view={options['view']:4s} {batches} batches, {samples} samples, "
              f"images {sorted(shapes)} uint8, bad samples {bad}, {samples / seconds:.0f} img/s\n"
              f"      labels {histogram}")
    mae_dir, graft_dir = args.workdir / "mae", args.workdir / "graft"
    print(f"== 5. MAE pretraining of a ViT-Tiny on {args.processes} processes -> {mae_dir}")
    pretrain("demo.yaml", mae_dir, shards / "train.json", args.processes)
    print(f"== 6. grafted MoCo v3 from the MAE weights, lower blocks at 0.1x the lr -> {graft_dir}")
    pretrain("graft_demo.yaml", graft_dir, shards / "train.json", args.processes, f"graft.init={mae_dir}")
    print("== 7. export the encoders")
    for run_dir in (mae_dir, graft_dir):
        kwargs = export.export(run_dir, run_dir / "encoder.pth")
        print(f"wrote {run_dir / 'encoder.pth'} (timm.create_model({kwargs['model_name']!r}, num_classes=0, "
              f"img_size={kwargs['img_size']}, patch_size={kwargs['patch_size']}) loads it strictly)")
    print(f"demo finished; everything is under {args.workdir}\n"
          f"TensorBoard: tensorboard --logdir {args.workdir}  (runs mae/tb and graft/tb)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
