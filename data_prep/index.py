"""lg-index: a manifest for WebDataset shards that lg-shard did not write.

    lg-index 'DIR/imagenet1k-train-{0000..1023}.tar' OUT/train.json [--split train] [--class-names FILE]

The pattern is expanded as webdataset expands shard lists (braces; several patterns joined by `::`);
the shards may be local files or URLs (http(s)://, pipe:, s3://, gs://; pretrain.data.locations). Each
shard is read through once: its bytes, SHA-256 and samples, what the training loader reads of them (an
image member jpg/jpeg/png/webp, cls, json). A sample's label is its `cls` member, or else its json's
"label". Class names come from --class-names (one per line, line i naming label i), else from the
json ("class_name", "class", or the folder of "filename", e.g. `n01440764/n01440764_10026.JPEG` in
timm's imagenet-1k-wds), else the label itself. Samples without an image or a label, and members of
other kinds, are listed in the manifest's `skipped`: the loader counts the former as bad samples.
Local shards inside OUT's folder are named relative to it (the folder can move); others keep their
path as given, URLs as they are.
"""

import argparse
import json
import multiprocessing
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm
from webdataset.shardlists import expand_urls

from pretrain.core.errors import UserError, cli_entry
from pretrain.core.files import sha256_of_file
from pretrain.data.locations import HashingReader, is_url, open_location
from pretrain.data.manifest import Manifest, ShardInfo
from pretrain.data.shard_tar import IMAGE_EXTENSIONS, is_loaded_member, label_of, read_shard

MAX_LISTED = 1000  # odd samples listed in the manifest by name; the rest are counted


@dataclass
class ShardIndex:
    """What one shard holds, as lg-index reads it."""

    location: str
    num_samples: int = 0
    bytes: int = 0
    sha256: str = ""
    labels: Counter = field(default_factory=Counter)
    names: dict = field(default_factory=dict)  # label -> class name, where the json tells
    odd: list = field(default_factory=list)  # [(key, reason)]
    # Extension -> count, members the loader never reads.
    other_members: Counter = field(default_factory=Counter)
    error: str = ""


def class_name_in(meta):
    """The class name a sample's json gives, or None."""
    for key in ("class_name", "class"):
        if isinstance(meta.get(key), str):
            return meta[key]
    filename = meta.get("filename")
    if isinstance(filename, str) and "/" in filename:
        return filename.rsplit("/", 2)[-2]
    return None


def index_shard(location):
    """Read one shard through (local file or URL) and return its ShardIndex; a read error is recorded."""
    result = ShardIndex(str(location))
    other = result.other_members
    try:
        stream = HashingReader(open_location(location)) if is_url(location) else None
        samples = read_shard(location, stream=stream, select=lambda name: _note_member(name, other))
        for sample in samples:
            result.num_samples += 1
            key = sample["__key__"]
            if not any(extension in sample for extension in IMAGE_EXTENSIONS):
                result.odd.append((key, f"no image member ({'/'.join(IMAGE_EXTENSIONS)})"))
                continue
            try:
                label = label_of(sample)
            except (KeyError, ValueError, TypeError) as error:
                result.odd.append((key, f"no label: {error}"))
                continue
            result.labels[label] += 1
            if "json" in sample and label not in result.names:
                try:
                    name = class_name_in(json.loads(sample["json"]))
                except ValueError:
                    name = None
                if name is not None:
                    result.names[label] = name
        if stream is not None:
            result.sha256, result.bytes = stream.sha256.hexdigest(), stream.bytes
        else:
            result.sha256, result.bytes = sha256_of_file(location), os.path.getsize(location)
    except (OSError, tarfile.TarError, ValueError) as error:  # a finding about that shard, not a crash
        result.error = str(error)
    return result


def _note_member(name, other):
    if is_loaded_member(name):
        return True
    other[name.rpartition(".")[2].lower()] += 1
    return False


def class_names(indexes, names_file):
    """The class list: from names_file, else what the shards' json named, else the labels themselves."""
    labels = sorted(set().union(*(index.labels for index in indexes)))
    if not labels:
        raise UserError('no sample of the shards has a label (a cls member, or a json with "label")')
    if labels[0] < 0:
        raise UserError(f"label {labels[0]} is negative; labels must be 0 .. classes - 1")
    if names_file:
        try:
            names = [line.strip() for line in Path(names_file).read_text().splitlines() if line.strip()]
        except OSError as error:
            raise UserError(f"--class-names {names_file}: {error}") from None
        if labels[-1] >= len(names):
            raise UserError(
                f"--class-names {names_file} names {len(names)} classes; the shards have label {labels[-1]}"
            )
        return names
    given = {}
    for index in indexes:
        for label, name in index.names.items():
            given.setdefault(label, name)
    return [given.get(label, str(label)) for label in range(labels[-1] + 1)]


def shard_name(location, out_dir):
    """How the manifest names a shard: relative to its folder when inside it, else as given."""
    if is_url(location):
        return location
    path = Path(location).resolve()
    return str(path.relative_to(out_dir)) if path.is_relative_to(out_dir) else str(path)


def build_manifest(locations, out, split, names_file=None, workers=1):
    """Index `locations` (in this order) and write the manifest `out`; return it."""
    out = Path(out)
    missing = [location for location in locations if not is_url(location) and not os.path.isfile(location)]
    if missing:
        raise UserError(
            f"shard {missing[0]} does not exist ({len(missing)} of the {len(locations)} the pattern "
            "names do not)"
        )
    indexes = []
    with multiprocessing.get_context("fork").Pool(max(1, min(workers, len(locations)))) as pool:
        for index in tqdm(
            pool.imap(index_shard, locations),
            total=len(locations),
            unit="shard",
            desc="indexing",
            dynamic_ncols=True,
        ):
            indexes.append(index)
    broken = [index for index in indexes if index.error]
    if broken:
        raise UserError(
            f"{len(broken)} shards could not be read, e.g. {broken[0].location}: {broken[0].error}; "
            "fix or leave them out of the pattern"
        )
    classes = class_names(indexes, names_file)
    odd = [
        {"path": f"{index.location}:{key}", "reason": reason}
        for index in indexes
        for key, reason in index.odd
    ]
    other = sum((index.other_members for index in indexes), Counter())
    skipped = odd[:MAX_LISTED] + (
        [{"path": "...", "reason": f"{len(odd) - MAX_LISTED} more samples"}] if len(odd) > MAX_LISTED else []
    )
    skipped += [
        {"path": f"*.{extension}", "reason": f"{count} members the loader does not read"}
        for extension, count in sorted(other.items())
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out_dir = out.parent.resolve()
    shards = [
        ShardInfo(shard_name(index.location, out_dir), index.num_samples, index.bytes, index.sha256)
        for index in indexes
    ]
    fingerprint = "lg-index:" + ",".join(index.sha256[:12] for index in indexes)[:4096]
    manifest = Manifest(
        split,
        classes,
        sum(s.num_samples for s in shards),
        shards,
        skipped=skipped,
        fingerprint=fingerprint,
        root=out.parent,
    )
    manifest.save(out)
    return manifest, len(odd)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lg-index", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "pattern", help="shard locations, with braces: 'DIR/train-{0000..1023}.tar' (quote it)"
    )
    parser.add_argument("out", type=Path, help="the manifest to write, e.g. OUT/train.json")
    parser.add_argument("--split", default=None, help="the split's name (default: the manifest's file name)")
    parser.add_argument("--class-names", default=None, help="a file naming class i on line i")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    return parser.parse_args(argv)


@cli_entry("lg-index")
def main(argv=None):
    args = parse_args(argv)
    if args.out.suffix != ".json":
        raise UserError(f"{args.out}: the manifest is a .json file (e.g. OUT/train.json)")
    locations = expand_urls(args.pattern)
    if not locations:
        raise UserError(f"pattern {args.pattern!r} names no shard")
    manifest, odd = build_manifest(
        locations, args.out, args.split or args.out.stem, args.class_names, args.workers
    )
    print(
        f"{args.out}: {len(manifest.shards)} shards, {manifest.num_samples} samples, {len(manifest.classes)} "
        f"classes; {odd} samples without an image or label (the loader counts them as bad)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
