"""lg-shard: write a split of ImageNet or any ImageFolder as WebDataset shards plus a manifest.

    lg-shard SRC OUT --split train [--layout imagenet|imagefolder] [--max-per-shard N | --shard-size-mb M]
             [--workers W] [--seed S] [--reencode] [--full-decode] [--max-side N [--quality Q]]
             [--subset-file 1percent.txt | --subset-fraction 0.01 [--subset-seed S]]

Every sample is `KEY.jpg` (the source file's bytes, unchanged unless --reencode converts a non-RGB or
non-JPEG image, or --max-side re-encodes an image whose longer side exceeds N at that size, as FFCV
stores ImageNet), `KEY.cls` (class index) and `KEY.json` ({"path", "class"}). The file list is shuffled
with the seed before it is cut into shards, so every shard mixes classes. Files that are not decodable
images are skipped and listed in the manifest.

A shard is written under a temporary name, its record saved under OUT/.{split}.progress/, and only
then renamed into place; running the same command again after a crash or Ctrl-C redoes only the
shards that are missing, so the finished set holds every image exactly once.
"""

import argparse
import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from data_prep.images import RESIZED_QUALITY, inspect_image, limit_side, to_rgb_jpeg
from data_prep.sources import find_split
from data_prep.subsets import read_subset_file, select_fraction, select_listed
from pretrain.core.errors import UserError, cli_entry
from pretrain.core.files import write_json_atomic
from pretrain.data.manifest import Manifest, ShardInfo
from pretrain.data.shard_tar import TAR_BLOCK, ShardTarWriter

log = logging.getLogger("lg-shard")
SPLITS = ("train", "val")


@dataclass
class ShardPlan:
    index: int
    name: str
    samples: list  # [(key, SourceImage)]


def _tar_bytes(image_bytes):
    """Archive bytes of a sample: three headers, the image rounded up to blocks, one block each for cls and
    json."""
    return 5 * TAR_BLOCK + -(-image_bytes // TAR_BLOCK) * TAR_BLOCK


def plan_shards(images, split, seed, max_per_shard=None, max_bytes=None, src=None):
    """Shuffle `images` with `seed` and cut the list into shards by count or by source bytes."""
    images = sorted(images, key=lambda image: image.path)
    random.Random(seed).shuffle(images)
    keyed = [(f"{position:08d}", image) for position, image in enumerate(images)]
    groups = []
    if max_bytes is None:
        groups = [keyed[i : i + max_per_shard] for i in range(0, len(keyed), max_per_shard)]
    else:
        size = 0
        for item in keyed:
            item_bytes = _tar_bytes(os.path.getsize(Path(src) / item[1].path))
            if not groups or size + item_bytes > max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += item_bytes
    return [ShardPlan(i, f"{split}-{i:06d}.tar", group) for i, group in enumerate(groups)]


def fingerprint(plans, classes, options):
    """A digest of everything that determines the shards' content."""
    digest = hashlib.sha256(json.dumps([classes, options], sort_keys=True).encode())
    for plan in plans:
        digest.update(plan.name.encode())
        for key, image in plan.samples:
            digest.update(f"\0{key}\0{image.path}\0{image.label}".encode())
    return digest.hexdigest()


def write_shard(
    src, out, progress, plan, reencode, full_decode, run_fingerprint, max_side=0, quality=RESIZED_QUALITY
):
    """Write one shard; its record is saved before the shard is renamed into place."""
    temporary = out / f".{plan.name}.tmp"
    skipped, converted, resized, read_bytes = [], 0, 0, 0
    with ShardTarWriter(temporary) as writer:
        for key, image in plan.samples:
            try:
                with open(os.path.join(src, image.path), "rb") as f:
                    data = f.read()
            except OSError as error:
                skipped.append({"path": image.path, "reason": f"unreadable: {error.strerror}"})
                continue
            read_bytes += len(data)
            problem, needs_conversion = inspect_image(data, full_decode)
            if problem:
                skipped.append({"path": image.path, "reason": problem})
                continue
            smaller = limit_side(data, max_side, quality) if max_side else None
            if smaller is not None:
                data, resized = smaller, resized + 1
            elif reencode and needs_conversion:
                data = to_rgb_jpeg(data)
                converted += 1
            meta = json.dumps({"path": image.path, "class": image.class_name}).encode()
            writer.write({"__key__": key, "jpg": data, "cls": str(image.label).encode(), "json": meta})
    shard = ShardInfo(plan.name, len(plan.samples) - len(skipped), writer.bytes, writer.sha256.hexdigest())
    record = {
        "fingerprint": run_fingerprint,
        "index": plan.index,
        "shard": asdict(shard),
        "skipped": skipped,
        "converted": converted,
        "resized": resized,
    }
    write_json_atomic(progress / f"{plan.index:06d}.json", record)
    os.replace(temporary, out / plan.name)
    return record, len(plan.samples), read_bytes


def _die_with_parent():
    """Pool workers: ignore Ctrl-C (the parent handles it) and die if the parent is SIGKILLed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _write_shard_task(task):
    return write_shard(*task)


def write_shards(tasks, workers, total_images):
    """Run the shard tasks (in a process pool when workers > 1), with a progress bar; yield records."""
    bar = tqdm(total=total_images, unit="img", unit_scale=True, desc="sharding", dynamic_ncols=True)
    started, read_mb = time.perf_counter(), 0.0
    if workers > 1 and len(tasks) > 1:
        pool = multiprocessing.get_context("fork").Pool(
            min(workers, len(tasks)), initializer=_die_with_parent
        )
        results = pool.imap_unordered(_write_shard_task, tasks)
    else:
        pool, results = None, map(_write_shard_task, tasks)
    try:
        for record, images, read_bytes in results:
            read_mb += read_bytes / 1e6
            bar.update(images)
            bar.set_postfix_str(f"{read_mb / max(time.perf_counter() - started, 1e-9):.0f} MB/s")
            yield record
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()


def _check_out(out, split):
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{split}.write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to output folder {out}: {error.strerror}") from None


def _classes_of_other_split(out, split):
    """The class list of the other split if it is already sharded into OUT: indices must agree."""
    for other in SPLITS:
        if other != split and (out / f"{other}.json").is_file():
            return Manifest.load(out / f"{other}.json").classes
    return None


def _load_done_records(out, split, progress, plans, run_fingerprint):
    """Records of shards a previous run of this same command completed; refuse foreign shards."""
    done = {}
    foreign = "was written by a different lg-shard command (other source, seed or shard options)"
    for plan in plans:
        if not (out / plan.name).exists():
            continue
        record_path = progress / f"{plan.index:06d}.json"
        if not record_path.is_file():
            raise UserError(
                f"{out / plan.name} exists but was not written by this command; "
                f"shard into an empty folder or remove the {split}-*.tar files"
            )
        record = json.loads(record_path.read_text())
        if record["fingerprint"] != run_fingerprint:
            raise UserError(f"{out / plan.name} {foreign}; shard into an empty folder or remove it")
        done[plan.index] = record
    names = {plan.name for plan in plans}
    for extra in sorted(out.glob(f"{split}-*.tar")):
        if extra.name not in names:
            raise UserError(f"{extra} {foreign}; shard into an empty folder or remove it")
    return done


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lg-shard", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="ImageNet root (holding train/ and val/) or an ImageFolder")
    parser.add_argument("out", type=Path, help="output folder for {split}-NNNNNN.tar and {split}.json")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument(
        "--layout",
        default="imagenet",
        choices=("imagenet", "imagefolder"),
        help="imagefolder: class = subfolder of SRC/SPLIT (or of SRC if that does not exist)",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--max-per-shard", type=int, default=1000, help="images per shard (default 1000)")
    size.add_argument("--shard-size-mb", type=float, help="cut shards by source bytes instead of count")
    parser.add_argument(
        "--workers",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="shards written in parallel processes (default: the CPUs available)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffle before sharding")
    parser.add_argument(
        "--reencode", action="store_true", help="convert CMYK/grayscale JPEGs and non-JPEG files to RGB JPEG"
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=0,
        help="re-encode images whose longer side exceeds N "
        "pixels at that size (FFCV stores ImageNet at 256-512); smaller ones keep their bytes",
    )
    parser.add_argument(
        "--quality",
        type=int,
        default=RESIZED_QUALITY,
        help=f"JPEG quality of the images --max-side re-encodes (default {RESIZED_QUALITY})",
    )
    parser.add_argument(
        "--full-decode",
        action="store_true",
        help="fully decode every JPEG to check it (default: a structural check, ~100x cheaper)",
    )
    subset = parser.add_mutually_exclusive_group()
    subset.add_argument(
        "--subset-file",
        type=Path,
        help="shard only the files this list names, one base name a "
        "line (SimCLR's ImageNet 1percent.txt / 10percent.txt); a missing name is an error",
    )
    subset.add_argument(
        "--subset-fraction",
        type=float,
        help="shard this fraction of every class (at least one image each), chosen by --subset-seed",
    )
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of --subset-fraction's choice")
    parser.add_argument(
        "--val-labels",
        type=Path,
        help="flat ImageNet val: ILSVRC2012_validation_ground_truth.txt or LOC_val_solution.csv "
        "(default: looked for in SRC)",
    )
    parser.add_argument(
        "--synsets",
        type=Path,
        help="the devkit's meta.mat (or wnids in ILSVRC2012_ID order) for the ground-truth IDs "
        "(default: meta.mat beside the label file)",
    )
    args = parser.parse_args(argv)
    if (
        args.max_per_shard < 1
        or (args.shard_size_mb is not None and args.shard_size_mb <= 0)
        or args.workers < 1
    ):
        parser.error("--max-per-shard, --shard-size-mb and --workers must be positive")
    if args.max_side < 0 or (args.max_side and args.max_side < 32) or not 1 <= args.quality <= 100:
        parser.error(f"--max-side {args.max_side}: 0 (off) or at least 32; --quality in 1-100")
    return args


@cli_entry("lg-shard")
def main(argv=None):
    args = parse_args(argv)
    out, split = args.out, args.split
    if not args.src.is_dir():
        raise UserError(f"source folder {args.src} does not exist")
    _check_out(out, split)
    log.info("listing %s images under %s", split, args.src)
    source = find_split(
        args.src,
        split,
        args.layout,
        classes=_classes_of_other_split(out, split),
        val_labels=args.val_labels,
        synsets=args.synsets,
    )
    log.info("found %d images in %d classes", len(source.images), len(source.classes))
    subset = {}
    if args.subset_file:
        names = read_subset_file(args.subset_file)
        source.images = select_listed(source.images, names, f"--subset-file {args.subset_file}")
        subset = {"file": str(args.subset_file), "names": len(names)}
    elif args.subset_fraction is not None:
        source.images = select_fraction(source.images, args.subset_fraction, args.subset_seed)
        subset = {"fraction": args.subset_fraction, "seed": args.subset_seed}
    if subset:
        log.info("subset %s: %d images", subset, len(source.images))
    max_bytes = None if args.shard_size_mb is None else int(args.shard_size_mb * 1e6)
    plans = plan_shards(source.images, split, args.seed, args.max_per_shard, max_bytes, args.src)
    resize = {"max_side": args.max_side, "quality": args.quality} if args.max_side else {}
    options = {
        "split": split,
        "layout": args.layout,
        "seed": args.seed,
        "reencode": args.reencode,
        "full_decode": args.full_decode,
        **({"subset": subset} if subset else {}),
        **({"resize": resize} if resize else {}),
    }
    run_fingerprint = fingerprint(plans, source.classes, options)

    manifest_path = out / f"{split}.json"
    if manifest_path.exists():
        if Manifest.load(manifest_path).fingerprint != run_fingerprint:
            raise UserError(f"{manifest_path} was written by a different lg-shard command; use another OUT")
        print(f"{manifest_path} is already complete")
        return 0

    progress = out / f".{split}.progress"
    progress.mkdir(exist_ok=True)
    for stale in out.glob(f".{split}-*.tar.tmp"):
        stale.unlink()
    records = _load_done_records(out, split, progress, plans, run_fingerprint)
    if records:
        log.info("resuming: %d of %d shards are already complete", len(records), len(plans))
    tasks = [
        (
            args.src,
            out,
            progress,
            plan,
            args.reencode,
            args.full_decode,
            run_fingerprint,
            args.max_side,
            args.quality,
        )
        for plan in plans
        if plan.index not in records
    ]
    pending_images = sum(len(task[3].samples) for task in tasks)
    for record in write_shards(tasks, args.workers, pending_images):
        records[record["index"]] = record

    records = [records[plan.index] for plan in plans]
    shards = [ShardInfo(**record["shard"]) for record in records]
    skipped = source.unlabeled + [item for record in records for item in record["skipped"]]
    resized = sum(record.get("resized", 0) for record in records)
    manifest = Manifest(
        split,
        source.classes,
        sum(s.num_samples for s in shards),
        shards,
        skipped,
        run_fingerprint,
        subset,
        {**resize, "resized": resized} if resize else {},
    )
    manifest.save(manifest_path)
    shutil.rmtree(progress)
    converted = sum(record["converted"] for record in records)
    print(
        f"wrote {manifest.num_samples} {split} samples in {len(shards)} shards "
        f"({sum(s.bytes for s in shards) / 1e9:.2f} GB) to {out}; skipped {len(skipped)}"
        + (f", re-encoded {converted}" if converted else "")
        + (f", resized {resized} to a longer side of {args.max_side}" if resize else "")
        + f"; manifest {manifest_path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
