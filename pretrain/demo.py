"""lg-demo: the whole pipeline end to end on the embedded digits data set, on the CPU.

    python -m pretrain.demo [--workdir runs/demo]

Steps: write the demo data set -> shard train and val -> verify the shards -> read them back through
the training loader (resampled, MAE view) and the evaluation loader (epoch mode) and report what came
out. Every step is idempotent: a second run reuses what the first one wrote.
"""
import argparse
import collections
import time
from pathlib import Path

from data_prep import demo_data, shard, verify
from pretrain.data import make_loader
from pretrain.errors import UserError, cli_entry

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


@cli_entry("lg-demo")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="lg-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    args = parser.parse_args(argv)
    images, shards = args.workdir / "digits", args.workdir / "shards"

    print("== 1. embedded data set ->", images)
    demo_data.main([str(images)])
    for split in ("train", "val"):
        print(f"== 2. shard {split} ->", shards)
        shard.main([str(images), str(shards), "--split", split, "--layout", "imagefolder",
                    "--max-per-shard", "100", "--workers", "2"])
        print(f"== 3. verify {split}")
        if verify.main([str(shards), "--split", split, "--workers", "2"]) != 0:
            raise UserError(f"lg-verify found problems in {shards}")

    print("== 4. read back through the loaders")
    for split, options in (("train", dict(view="mae", mode="resampled", rank=0, world_size=1)),
                           ("val", dict(view="eval", mode="epoch", rank=0, world_size=1))):
        manifest = shards / f"{split}.json"
        batches, samples, labels, bad, shapes, seconds = read_back(manifest, 64, num_workers=2, **options)
        histogram = " ".join(f"{label}:{count}" for label, count in sorted(labels.items()))
        print(f"{split:5s} {options['mode']:9s} view={options['view']:4s} {batches} batches, {samples} samples, "
              f"images {sorted(shapes)} uint8, bad samples {bad}, {samples / seconds:.0f} img/s\n"
              f"      labels {histogram}")
    print(f"demo finished; everything is under {args.workdir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
