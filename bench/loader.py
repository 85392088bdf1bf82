"""Loader throughput: our WebDataset loader vs the decode+augment ceiling vs torchvision ImageFolder.

    python -m bench.loader [--images 3000] [--workers 2] [--batch-size 64] [--repeats 3]
    python -m bench.loader --resized [--max-sides 320 384 512] [--images 3000] [--repeats 3]
    python -m bench.loader --streaming [--images 3000] [--workers 2] [--repeats 3]

All contenders read the same full-size JPEGs (bench/photos.py), from the page cache, with the MAE
augmentation at 224 px (RandomResizedCrop(0.2-1, bicubic) + flip) and the same number of processes:
  (a)  ceiling: our decode + augment (torchvision decoder, v2 transforms on uint8 tensors) in a plain
       loop split over `workers` processes; no DataLoader, no batching, nothing sent between processes;
  (b)  ours: lg-shard's tars through pretrain.data.loader (epoch mode), uint8 batches as the trainer gets
       them (it normalizes on its accelerator);
  (b') ours, plus converting every batch to normalized float32 on this CPU in the consumer process;
  (b'') ours without the SHA-256 check of each shard before it is read (data.verify_shards=false): the
       check's cost is 1 - (b) / (b'');
  (c)  torchvision ImageFolder + DataLoader(shuffle) as usually written: PIL decoding, PIL
       augmentation, ToTensor and Normalize in the workers (float32 batches);
  (c') ImageFolder + DataLoader with our decoder and uint8 view: the same transforms as (a) and (b),
       which separates the container (tar shards vs files) from the rest.
Throughput is counted from the first batch on (steady state, what an epoch of ImageNet sees); the
time to the first batch is reported beside it, as it is a fixed cost per epoch (ours fills a
1,000-sample shuffle buffer per worker first). The ceiling starts its processes before the clock.
Prints a table and a JSON line; medians over the repeats, which are interleaved so that noise on the
machine hits every contender alike.

--resized: the same photographs sharded as they are and with `lg-shard --max-side N` for each N; per
shard set, on one core (one process, one thread, the samples already in memory), decode + view img/s
of the MAE view and MoCo v3 pairs/s (BYOL's two views), the bytes of the shards, and the PSNR of the
views against those from the original shards with the same crop (drawn on the original, scaled to the
resized image: the geometry of the view, its colour steps left out). The row "scaled decoding" is the
original shards with data.scaled_decoding (the crop decodes the JPEG at 1/2, 1/4 or 1/8 scale where it
can), its PSNR that of the same views, same seeds, from the full decode. MoCo pairs are timed three
ways: PIL colour steps (the official ops, data.colour_ops: pil), data.colour_ops: tensor (our float
implementation, pretrain/data/colour_ops.py), and, on the original shards, torchvision's own tensor ops on
uint8;
the PSNR of the tensor pair against the PIL pair on the same seeds is printed with it. --photo-size
1000x750 (say)
measures larger originals; --img-size smaller views.

--streaming: (b) from the files and from the same shards served by a loopback HTTP server (http.server in
a subprocess; webdataset's opener, curl, reads them), interleaved.
"""

import argparse
import json
import multiprocessing
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T
from torchvision.transforms import v2

from bench.photos import cpu_count, make_photos, warm_page_cache
from pretrain.data.loader import make_loader
from pretrain.data.manifest import Manifest
from pretrain.data.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncodedImage,
    TwoViews,
    byol_recipe,
    decode_image,
    make_view,
    normalize,
    random_crop,
)

IMG = 224
CONTENDERS = {
    "ceiling": "(a)  decode+augment ceiling",
    "ours": "(b)  layergraft, uint8 batches",
    "ours_normalized": "(b') layergraft + float32 on this CPU",
    "ours_unverified": "(b'') layergraft, shard checksums off",
    "imagefolder": "(c)  ImageFolder, PIL + float32",
    "imagefolder_uint8": "(c') ImageFolder, our decode + view",
}


def _ceiling_part(files):
    torch.set_num_threads(1)
    view = make_view("mae", IMG)
    for path in files:
        view(decode_image(Path(path).read_bytes()))
    return len(files)


def ceiling(files, workers, batch_size, shards):
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        pool.map(abs, range(workers))  # start the processes before the clock
        started = time.perf_counter()
        done = sum(pool.map(_ceiling_part, [files[w::workers] for w in range(workers)]))
        return done / (time.perf_counter() - started), 0.0


def timed(batches, count, convert=False):
    """(img/s after the first batch, seconds to the first batch) of iterating `batches`."""
    started = time.perf_counter()
    first_batch_at, after_first = None, 0
    for batch in batches:
        if convert:
            normalize(batch["images"])
        if first_batch_at is None:
            first_batch_at = time.perf_counter()
        else:
            after_first += count(batch)
    return after_first / (time.perf_counter() - first_batch_at), first_batch_at - started


def ours(files, workers, batch_size, shards, convert=False, verify=True):
    loader = make_loader(
        shards / "train.json",
        batch_size,
        view="mae",
        img_size=IMG,
        mode="epoch",
        num_workers=workers,
        rank=0,
        world_size=1,
        verify_shards=verify,
    )
    return timed(loader.epoch(0), lambda batch: len(batch["labels"]), convert)


def imagefolder(files, workers, batch_size, shards, uint8=False):
    options = {}
    if uint8:
        transform = make_view("mae", IMG)
        options["loader"] = lambda path: decode_image(Path(path).read_bytes())
    else:
        transform = T.Compose(
            [
                T.RandomResizedCrop(IMG, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
    root = Path(files[0]).parents[1]
    loader = DataLoader(
        datasets.ImageFolder(root, transform, **options),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
    )
    return timed(loader, lambda batch: len(batch[1]))


RUNNERS = {
    "ceiling": ceiling,
    "ours": ours,
    "ours_normalized": lambda *args: ours(*args, convert=True),
    "ours_unverified": lambda *args: ours(*args, verify=False),
    "imagefolder": imagefolder,
    "imagefolder_uint8": lambda *args: imagefolder(*args, uint8=True),
}


def shard_images(shards):
    """{path: image bytes} of every sample of a manifest's shards, read into memory."""
    manifest = Manifest.load(shards / "train.json")
    return {
        json.loads(s["json"])["path"]: s["jpg"]
        for s in wds.tarfile_samples([{"url": u} for u in manifest.urls])
    }


def torchvision_tensor_pair(img_size):
    """BYOL's pair with torchvision's own tensor colour ops on uint8 (ColorJitter, RandomGrayscale,
    GaussianBlur with a 13-tap kernel, 3 sigma at sigma 2, RandomSolarize): the library's way, against which
    our float implementation (data.colour_ops: tensor) is measured."""

    def pipeline(view):
        colour = v2.Compose(
            [
                v2.RandomApply([v2.ColorJitter(*view.jitter)], p=view.jitter_p),
                v2.RandomGrayscale(p=view.grayscale_p),
                v2.RandomApply([v2.GaussianBlur(13, sigma=tuple(view.blur_sigma))], p=view.blur_p),
                v2.RandomSolarize(threshold=128, p=view.solarize_p),
            ]
        )
        return v2.Compose([random_crop(img_size, view), colour, v2.RandomHorizontalFlip()])

    return TwoViews(pipeline(byol_recipe()), pipeline(byol_recipe(second=True)))


# The contenders of the per-core rates: (view, how its colour steps are computed).
PER_CORE = {
    "mae": ("mae", "pil"),
    "byol": ("byol", "pil"),
    "byol_tensor": ("byol", "tensor"),
    "byol_torchvision": (torchvision_tensor_pair, "pil"),
}


def per_core_rate(images, view_name, img_size=IMG, read=decode_image, colour_ops="pil"):
    """Images (or pairs) per second of decode + view on this one core (`read`: EncodedImage for scaled
    decoding)."""
    torch.set_num_threads(1)
    view = make_view(view_name, img_size, colour_ops)
    torch.manual_seed(0)
    started = time.perf_counter()
    for data in images:
        view(read(data))
    return len(images) / (time.perf_counter() - started)


def psnr_db(mse):
    """PSNR (dB) of uint8 pixels from their mean squared error."""
    return float(10 * np.log10(255**2 / mse))


def scaled_decoding_psnr(images, view_name, img_size):
    """Mean PSNR (dB) of the views with scaled decoding against the same views (same seeds) fully decoded,
    over the views decoded at a reduced scale (the others are identical), and the fraction of images with
    such a view."""
    view, values, scaled = make_view(view_name, img_size), [], 0
    for seed, data in enumerate(images):
        torch.manual_seed(seed)
        full = view(decode_image(data))
        torch.manual_seed(seed)
        encoded = EncodedImage(data)
        reduced = view(encoded)
        if not encoded._scaled:
            continue
        scaled += 1
        for a, b in zip(*((v,) if torch.is_tensor(v) else v for v in (full, reduced))):
            mse = torch.mean((a.double() - b.double()) ** 2).item()
            if mse > 0:  # the view of a pair whose crop was decoded in full is identical: left out
                values.append(psnr_db(mse))
    return float(np.mean(values)) if values else float("nan"), scaled / len(images)


def colour_ops_psnr(images, img_size):
    """PSNR (dB, of the mean squared error over all views) of BYOL's pair with data.colour_ops: tensor against
    the same pair (same seeds) with the PIL colour steps, and whether both left the random generator in the
    same state after every image."""
    pil, tensor = make_view("byol", img_size, "pil"), make_view("byol", img_size, "tensor")
    errors, same_draws = [], True
    for seed, data in enumerate(images):
        image, pairs, states = decode_image(data), [], []
        for view in (pil, tensor):
            torch.default_generator.manual_seed(seed)
            pairs.append(view(image))
            states.append(torch.get_rng_state())
        same_draws &= torch.equal(*states)
        errors += [torch.mean((a.double() - b.double()) ** 2).item() for a, b in zip(*pairs)]
    return psnr_db(np.mean(errors)), same_draws


def view_psnr(original, resized, scale, interpolation, img_size=IMG, seed=0):
    """Mean PSNR (dB) of random resized crops of the resized images against the same crops of the
    originals."""
    generator, values = torch.Generator().manual_seed(seed), []
    mode = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}[interpolation]
    for path, data in original.items():
        full, small = decode_image(data), decode_image(resized[path])
        torch.manual_seed(int(torch.randint(2**31, (), generator=generator)))
        top, left, height, width = T.RandomResizedCrop.get_params(full, scale=scale, ratio=(3 / 4, 4 / 3))
        sy, sx = small.shape[1] / full.shape[1], small.shape[2] / full.shape[2]
        views = [
            v2.functional.resized_crop(
                image,
                round(y),
                round(x),
                max(1, round(h)),
                max(1, round(w)),
                [img_size, img_size],
                interpolation=mode,
                antialias=True,
            ).double()
            for image, (y, x, h, w) in (
                (full, (top, left, height, width)),
                (small, (top * sy, left * sx, height * sy, width * sx)),
            )
        ]
        mse = torch.mean((views[0] - views[1]) ** 2).item()
        values.append(psnr_db(max(mse, 1e-10)))
    return float(np.mean(values))


def resized(args):
    size = "" if args.photo_size == "500x375" else f"_{args.photo_size}"
    photos = args.data / f"photos{args.images}{size}"
    files = make_photos(photos, args.images, size=tuple(map(int, args.photo_size.split("x"))))
    sets = {}
    for max_side in [0, *args.max_sides]:
        shards = args.data / (f"photos{args.images}{size}_shards" + (f"_max{max_side}" if max_side else ""))
        if not (shards / "train.json").exists():
            extra = ["--max-side", str(max_side)] if max_side else []
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "data_prep.shard",
                    str(photos),
                    str(shards),
                    "--split",
                    "train",
                    "--layout",
                    "imagefolder",
                    "--max-per-shard",
                    "100",
                    *extra,
                ],
                check=True,
                capture_output=True,
            )
        manifest = Manifest.load(shards / "train.json")
        sets[max_side] = (shard_images(shards), sum(s.bytes for s in manifest.shards))
    sets["scaled decoding"] = sets[0]
    readers = {key: EncodedImage if key == "scaled decoding" else decode_image for key in sets}
    rates = {key: {name: [] for name in PER_CORE} for key in sets}
    # Warm-up: the first must not pay for it.
    per_core_rate(list(sets[0][0].values())[:50], "byol", args.img_size)
    for _ in range(args.repeats):  # interleaved
        for key, (images, _) in sets.items():
            for name, (view_name, colour_ops) in PER_CORE.items():
                if name == "byol_torchvision" and key != 0:
                    continue  # the library's tensor ops: measured on the original shards only
                rates[key][name].append(
                    per_core_rate(list(images.values()), view_name, args.img_size, readers[key], colour_ops)
                )
    original = sets[0][0]
    rows = {}
    for key, (images, size) in sets.items():
        mae, pairs, tensor_pairs = (
            statistics.median(rates[key][name]) for name in ("mae", "byol", "byol_tensor")
        )
        rows[key] = {
            "max_side": key or "original",
            "megabytes": round(size / 1e6, 1),
            "mae_img_per_s": round(mae, 1),
            "mocov3_pairs_per_s": round(pairs, 1),
            "mocov3_tensor_colour_pairs_per_s": round(tensor_pairs, 1),
        }
        if key == "scaled decoding":
            (mae_db, mae_share), (moco_db, moco_share) = (
                scaled_decoding_psnr(list(images.values()), name, args.img_size) for name in ("mae", "byol")
            )
            rows[key].update(
                mae_psnr_db=round(mae_db, 2),
                mocov3_psnr_db=round(moco_db, 2),
                mae_scaled_share=round(mae_share, 3),
                mocov3_scaled_share=round(moco_share, 3),
            )
        elif key:
            rows[key].update(
                mae_psnr_db=round(view_psnr(original, images, (0.2, 1.0), "bicubic", args.img_size), 2),
                mocov3_psnr_db=round(view_psnr(original, images, (0.08, 1.0), "bilinear", args.img_size), 2),
            )
    rows[0]["mocov3_torchvision_tensor_pairs_per_s"] = round(
        statistics.median(rates[0]["byol_torchvision"]), 1
    )
    colour_db, same_draws = colour_ops_psnr(list(original.values()), args.img_size)
    base = rows[0]
    print(
        f"{args.photo_size} photos, {args.img_size} px views; MoCo pairs with PIL colour steps (the official"
        f" ops) and with data.colour_ops: tensor ('tensor'); x: against the original shards' PIL figure"
    )
    print(
        f"{'shards':<16}{'MB':>8}{'MAE img/s/core':>16}{'x':>6}{'MoCo pairs/s/core':>19}{'x':>6}"
        f"{'tensor':>8}{'x':>6}{'MAE PSNR':>10}{'MoCo PSNR':>11}"
    )
    for row in rows.values():
        print(
            f"{str(row['max_side']):<16}{row['megabytes']:>8}{row['mae_img_per_s']:>16.0f}"
            f"{row['mae_img_per_s'] / base['mae_img_per_s']:>6.2f}{row['mocov3_pairs_per_s']:>19.0f}"
            f"{row['mocov3_pairs_per_s'] / base['mocov3_pairs_per_s']:>6.2f}"
            f"{row['mocov3_tensor_colour_pairs_per_s']:>8.0f}"
            f"{row['mocov3_tensor_colour_pairs_per_s'] / base['mocov3_pairs_per_s']:>6.2f}"
            f"{row.get('mae_psnr_db', float('nan')):>10.2f}"
            f"{row.get('mocov3_psnr_db', float('nan')):>11.2f}"
        )
    torchvision_pairs = base["mocov3_torchvision_tensor_pairs_per_s"]
    print(
        f"MoCo pair, original shards: torchvision's tensor ops on uint8 {torchvision_pairs:.0f} pairs/s/core"
        f" ({torchvision_pairs / base['mocov3_pairs_per_s']:.2f}x PIL); data.colour_ops: tensor against PIL"
        f" on the same seeds: {colour_db:.1f} dB, same random draws: {same_draws}"
    )
    result = {
        "bench": "loader_resized",
        "images": len(files),
        "photo_size": args.photo_size,
        "img_size": args.img_size,
        "machine": f"{platform.machine()} {cpu_count()} CPUs",
        "torch": torch.__version__,
        "rows": list(rows.values()),
        "tensor_colour_psnr_db": round(colour_db, 2),
        "tensor_colour_same_draws": same_draws,
        "runs": {str(k): v for k, v in rates.items()},
    }
    print(json.dumps(result))


def streaming(args):
    """Our loader on the same shards from local files and from a loopback HTTP server (Python's
    http.server in a subprocess), interleaved; img/s after the first batch."""
    import socket

    photos, shards = args.data / f"photos{args.images}", args.data / f"photos{args.images}_shards"
    make_photos(photos, args.images)
    if not (shards / "train.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.shard",
                str(photos),
                str(shards),
                "--split",
                "train",
                "--layout",
                "imagefolder",
                "--max-per-shard",
                "100",
            ],
            check=True,
            capture_output=True,
        )
    warm_page_cache(shards.glob("*.tar"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(shards)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        manifest = Manifest.load(shards / "train.json")
        for shard in manifest.shards:
            shard.name = f"http://127.0.0.1:{port}/{shard.name}"
        remote = args.data / f"photos{args.images}_urls"
        remote.mkdir(exist_ok=True)
        manifest.save(remote / "train.json")
        runs = {"local": [], "http": []}
        for _ in range(args.repeats):
            for name, where in (("local", shards), ("http", remote)):
                runs[name].append(ours(None, args.workers, args.batch_size, where)[0])
    finally:
        server.kill()
        server.wait()
    median = {name: statistics.median(values) for name, values in runs.items()}
    print(f"{'shards':<10}{'img/s':>8}{'x local':>9}   runs")
    for name, values in runs.items():
        print(
            f"{name:<10}{median[name]:>8.0f}{median[name] / median['local']:>9.2f}   "
            + ", ".join(f"{v:.0f}" for v in values)
        )
    print(
        json.dumps(
            {
                "bench": "loader_streaming",
                "images": args.images,
                "workers": args.workers,
                "machine": f"{platform.machine()} {cpu_count()} CPUs",
                "img_per_s": median,
                "runs": runs,
                "http_vs_local": round(median["http"] / median["local"], 3),
                "target": 0.9,
            }
        )
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=cpu_count())
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("runs/bench"))
    parser.add_argument(
        "--resized", action="store_true", help="original vs lg-shard --max-side shards, per core"
    )
    parser.add_argument(
        "--streaming", action="store_true", help="our loader from files vs from a loopback HTTP server"
    )
    parser.add_argument("--max-sides", type=int, nargs="+", default=[320, 384, 512])
    parser.add_argument("--photo-size", default="500x375", help="--resized: WxH of the photographs")
    parser.add_argument("--img-size", type=int, default=IMG, help="--resized: the views' size")
    args = parser.parse_args()
    if args.resized:
        return resized(args)
    if args.streaming:
        return streaming(args)
    photos, shards = args.data / f"photos{args.images}", args.data / f"photos{args.images}_shards"
    files = make_photos(photos, args.images)
    if not (shards / "train.json").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "data_prep.shard",
                str(photos),
                str(shards),
                "--split",
                "train",
                "--layout",
                "imagefolder",
                "--max-per-shard",
                "100",
            ],
            check=True,
            capture_output=True,
        )
    megabytes = warm_page_cache(files) / 1e6
    warm_page_cache(shards.glob("*.tar"))

    runs, startup = {name: [] for name in CONTENDERS}, {name: [] for name in CONTENDERS}
    for _ in range(args.repeats):
        for name, run in RUNNERS.items():
            rate, first_batch = run(files, args.workers, args.batch_size, shards)
            runs[name].append(rate)
            startup[name].append(first_batch)
    median = {name: statistics.median(values) for name, values in runs.items()}
    first_batch = {name: statistics.median(values) for name, values in startup.items()}
    result = {
        "bench": "loader",
        "images": len(files),
        "megabytes": round(megabytes, 1),
        "workers": args.workers,
        "batch_size": args.batch_size,
        "img_size": IMG,
        "machine": f"{platform.machine()} {cpu_count()} CPUs",
        "torch": torch.__version__,
        "img_per_s": {k: round(v, 1) for k, v in median.items()},
        "runs": {k: [round(v, 1) for v in values] for k, values in runs.items()},
        "first_batch_s": {k: round(v, 3) for k, v in first_batch.items()},
        "ours_vs_imagefolder": round(median["ours"] / median["imagefolder"], 3),
        "ours_vs_ceiling": round(median["ours"] / median["ceiling"], 3),
        "ours_normalized_vs_imagefolder": round(median["ours_normalized"] / median["imagefolder"], 3),
        "checksum_cost": round(1 - median["ours"] / median["ours_unverified"], 3),
        "targets": {"ours_vs_imagefolder": 1.3, "ours_vs_ceiling": 0.9},
    }
    print(f"{'loader':<40}{'img/s':>8}{'x ceiling':>11}{'1st batch':>11}   runs")
    for name, label in CONTENDERS.items():
        runs_text = ", ".join(f"{v:.0f}" for v in runs[name])
        print(
            f"{label:<40}{median[name]:>8.0f}{median[name] / median['ceiling']:>11.2f}"
            f"{first_batch[name]:>10.2f}s   {runs_text}"
        )
    print(
        f"ours / ImageFolder = {result['ours_vs_imagefolder']:.2f}x (target >= 1.3), "
        f"ours / ceiling = {result['ours_vs_ceiling']:.2f}x (target >= 0.9), shard checksums cost "
        f"{100 * result['checksum_cost']:.1f} % of the throughput"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
