"""lg-demo-data: write the embedded demo data set as an ImageFolder of RGB JPEGs.

The images are scikit-learn's handwritten digits (1,797 8x8 grayscale scans, 10 classes), which ship
inside the scikit-learn package, so nothing is downloaded. They are upscaled to 32 px and split per
class into train and val:

    OUT/train/{0..9}/NNNN.jpg    OUT/val/{0..9}/NNNN.jpg
"""

import argparse
import os
import random
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from pretrain.core.errors import UserError, cli_entry

JPEG_QUALITY = 95


def write_demo_data(out, size=32, val_fraction=0.2, seed=0):
    """Write the digits under `out` (atomically: a finished folder is never half written); return counts."""
    from sklearn.datasets import load_digits

    out = Path(out)
    digits = load_digits()
    by_class = {}
    for index, label in enumerate(digits.target):
        by_class.setdefault(int(label), []).append(index)
    rng = random.Random(seed)
    split_of = {}
    for indices in by_class.values():
        rng.shuffle(indices)
        num_val = round(len(indices) * val_fraction)
        split_of.update({i: "val" for i in indices[:num_val]})
        split_of.update({i: "train" for i in indices[num_val:]})

    building = out.with_name(f".{out.name}.partial")
    shutil.rmtree(building, ignore_errors=True)
    counts = {"train": 0, "val": 0}
    for index, pixels in enumerate(digits.images):
        split, label = split_of[index], int(digits.target[index])
        gray = Image.fromarray(np.uint8(np.round(pixels * (255 / 16))), mode="L")
        image = gray.resize((size, size), Image.BICUBIC).convert("RGB")
        folder = building / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index:04d}.jpg", quality=JPEG_QUALITY)
        counts[split] += 1
    os.replace(building, out)
    return counts


def main_args(argv):
    parser = argparse.ArgumentParser(prog="lg-demo-data", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to create (skipped if it already holds the data set)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    return parser.parse_args(argv)


@cli_entry("lg-demo-data")
def main(argv=None):
    args = main_args(argv)
    if (args.out / "train").is_dir() and (args.out / "val").is_dir():
        print(f"{args.out} already holds the demo data set")
        return 0
    if args.out.exists() and any(args.out.iterdir()):
        raise UserError(f"{args.out} exists and is not the demo data set; choose an empty or new folder")
    try:
        if args.out.exists():
            args.out.rmdir()
        counts = write_demo_data(args.out, size=args.size)
    except OSError as error:
        raise UserError(f"cannot write {args.out}: {error.strerror}") from None
    print(f"wrote {counts['train']} train and {counts['val']} val images of 10 digit classes to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
