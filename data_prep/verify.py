"""lg-verify: re-read every shard of a split and check it against its manifest.

    lg-verify OUT --split train [--workers W]

A manifest's shards may be URLs (http(s)://, pipe:, s3://, gs://): they are read through webdataset's
opener.

Checks each shard's size, SHA-256 and sample count, decodes every image fully with the training
loader's decoder (and, for shards written with --max-side N, that no image's longer side exceeds N),
and checks that labels (cls, or the json's "label") lie in the class list and agree with each sample's
json. Prints one line per problem; exit code 1 if
there is any.
"""

import argparse
import json
import multiprocessing
import os
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from data_prep.shard import SPLITS
from pretrain.core.errors import cli_entry
from pretrain.core.files import sha256_of_file
from pretrain.data.locations import digest_of, is_url
from pretrain.data.manifest import Manifest
from pretrain.data.shard_tar import IMAGE_EXTENSIONS, LOADED_EXTENSIONS, image_bytes, label_of
from pretrain.data.views import decode_image


def verify_shard(path, expected, classes, max_side=0):
    """Problems of one shard (a list of strings), and how many images were decoded."""
    name = path if is_url(path) else Path(path).name
    if is_url(path):  # a stream: its bytes and digest as it reads (webdataset's opener)
        try:
            digest, size = digest_of(path)
        except OSError as error:
            return [f"{name}: unreadable: {error}"], 0
    elif not os.path.isfile(path):
        return [f"{name}: missing"], 0
    else:
        digest, size = sha256_of_file(path), os.path.getsize(path)
    problems = []
    if size != expected.bytes:
        problems.append(f"{name}: {size} bytes, manifest says {expected.bytes}")
    if digest != expected.sha256:
        problems.append(f"{name}: SHA-256 differs from the manifest (the file changed after sharding)")

    def note_read_error(error):
        problems.append(f"{name}: unreadable tar data: {error}")
        return False  # stop reading this shard

    count = 0
    for sample in wds.tarfile_samples([{"url": str(path)}], handler=note_read_error):
        if not any(extension in sample for extension in LOADED_EXTENSIONS):
            continue  # the loader never sees it (lg-index lists such members)
        count += 1
        where = f"{name}:{sample['__key__']}"
        missing = [] if any(m in sample for m in ("cls", "json")) else ["cls"]
        if not any(extension in sample for extension in IMAGE_EXTENSIONS):
            missing.insert(0, "/".join(IMAGE_EXTENSIONS))
        if missing:
            problems.append(f"{where}: no {', '.join(missing)} member")
            continue
        try:
            height, width = decode_image(image_bytes(sample)).shape[1:]
            if max_side and max(height, width) > max_side:
                problems.append(
                    f"{where}: {width}x{height} pixels, longer than the manifest's max_side {max_side}"
                )
        except Exception as error:  # any decoder failure is a finding, not a crash
            problems.append(f"{where}: image does not decode: {error}")
        try:
            label, meta = label_of(sample), json.loads(sample.get("json", b"{}"))
            # lg-shard's json names the class; others (timm's imagenet-1k-wds) give the label again
            named = meta.get("class", classes[label] if 0 <= label < len(classes) else None)
            if not 0 <= label < len(classes) or named != classes[label] or meta.get("label", label) != label:
                problems.append(f"{where}: label {label} does not match its json {meta}")
        except (ValueError, TypeError, KeyError) as error:
            problems.append(f"{where}: bad cls/json member: {error}")
    if count != expected.num_samples:
        problems.append(f"{name}: {count} samples, manifest says {expected.num_samples}")
    return problems, count


def _verify_task(task):
    return verify_shard(*task)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lg-verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the folder lg-shard wrote")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    return parser.parse_args(argv)


@cli_entry("lg-verify")
def main(argv=None):
    args = parse_args(argv)
    manifest = Manifest.load(args.out / f"{args.split}.json")
    max_side = manifest.resize.get("max_side", 0)
    tasks = [(url, shard, manifest.classes, max_side) for url, shard in zip(manifest.urls, manifest.shards)]
    problems, total = [], 0
    with multiprocessing.get_context("fork").Pool(max(1, min(args.workers, len(tasks)))) as pool:
        bar = tqdm(
            total=manifest.num_samples, unit="img", unit_scale=True, desc="verifying", dynamic_ncols=True
        )
        for shard_problems, count in pool.imap(_verify_task, tasks):
            problems += shard_problems
            total += count
            bar.update(count)
        bar.close()
    for problem in problems:
        print(problem)
    if total != manifest.num_samples:
        problems.append(f"{total} samples in the shards, manifest says {manifest.num_samples}")
        print(problems[-1])
    status = f"{len(problems)} problems" if problems else "OK"
    print(f"{args.out / (args.split + '.json')}: {len(tasks)} shards, {total} samples: {status}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
