"""Full-size benchmark JPEGs cut from the real photographs that ship inside scikit-image.

Each image is a random 4:3 crop (40-100 % of the photo's height) of one of seven colour photographs,
resized to 500x375 (ImageNet's typical size), randomly mirrored, saved at JPEG quality 90 (~45 KB).
Written as an ImageFolder with one class per source photograph; deterministic for a given seed.
"""

import os
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina", "rocket")
SIZE = (500, 375)


def make_photos(root, count, seed=0, size=SIZE):
    """Write `count` JPEGs of `size` (w, h) under root/<photo>/NNNNN.jpg unless they already exist; return
    the file list. Sizes above the source photographs' are upscaled: smoother than real photos of that
    size."""
    import skimage.data

    root = Path(root)
    files = [root / PHOTOS[i % len(PHOTOS)] / f"{i:05d}.jpg" for i in range(count)]
    if all(f.exists() for f in files):
        return files
    rng = np.random.default_rng(seed)
    sources = [getattr(skimage.data, name)() for name in PHOTOS]
    for i, path in enumerate(files):
        photo = sources[i % len(sources)]
        height, width = photo.shape[:2]
        crop_w = min(width, int(height * rng.uniform(0.4, 1.0) * 4 / 3))
        crop_h = crop_w * 3 // 4
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        image = Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize(size, Image.BICUBIC)
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, quality=90)
    return files


def warm_page_cache(files):
    """Read every file once so that all contenders start from the page cache."""
    return sum(len(Path(f).read_bytes()) for f in files)


def cpu_count():
    return len(os.sched_getaffinity(0))
