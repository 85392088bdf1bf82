"""Sharding throughput: lg-shard vs `tar cf` of the same files, and our tar writer vs webdataset's.

    python -m bench.shard [--images 3000] [--repeats 3]

All contenders read the same full-size JPEGs (bench/photos.py) from the page cache and write into the
same folder (default: on /dev/shm, so that disk write-back, which the same bytes cost every
contender, does not drown the CPU costs in noise); MB/s counts source image bytes over wall time:
  tar cf              GNU tar archiving the files (no checks, no shuffling, one process);
  tar cf && sha256sum the same, then a checksum of the archive, as lg-shard's manifest has one;
  lg-shard -w1 / -wN  the whole command as a user runs it (listing, shuffle, structural JPEG check,
                      SHA-256, manifest), with 1 and with N worker processes;
  writer: ours        the per-file work of lg-shard (read, check, write) in one process with
                      pretrain.data.shard_tar.ShardTarWriter, without the command around it;
  writer: webdataset  the same loop with webdataset's TarWriter.
Prints a table and a JSON line; medians over interleaved repeats.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import webdataset as wds

from bench.photos import cpu_count, make_photos, warm_page_cache
from data_prep.images import inspect_image
from pretrain.data.shard_tar import ShardTarWriter

MAX_PER_SHARD = 100


def run_command(command, cwd=None, stdin=None):
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, cwd=cwd, input=stdin)
    if result.returncode != 0:
        raise SystemExit(f"{command[0]} {command[1]} failed: {result.stderr.decode()[-2000:]}")
    return time.perf_counter() - started


def tar_cf(photos, files, out):
    names = "\n".join(str(Path(f).relative_to(photos)) for f in files).encode()
    return run_command(["tar", "cf", str(out.resolve() / "all.tar"), "-T", "-"], cwd=photos, stdin=names)


def tar_cf_sha256(photos, files, out):
    """tar cf, then SHA-256 of the archive: the same checksum work lg-shard does for its manifest."""
    names = "\n".join(str(Path(f).relative_to(photos)) for f in files).encode()
    archive = out.resolve() / "all.tar"
    return run_command(
        ["sh", "-c", f"tar cf {archive} -T - && sha256sum {archive} > /dev/null"], cwd=photos, stdin=names
    )


def lg_shard(photos, files, out, workers):
    return run_command(
        [
            sys.executable,
            "-m",
            "data_prep.shard",
            str(photos),
            str(out),
            "--split",
            "train",
            "--layout",
            "imagefolder",
            "--max-per-shard",
            str(MAX_PER_SHARD),
            "--workers",
            str(workers),
        ]
    )


def writer_loop(photos, files, out, make_writer):
    started = time.perf_counter()
    for first in range(0, len(files), MAX_PER_SHARD):
        with make_writer(out / f"train-{first // MAX_PER_SHARD:06d}.tar") as writer:
            for index, path in enumerate(files[first : first + MAX_PER_SHARD], start=first):
                data = Path(path).read_bytes()
                problem, _ = inspect_image(data)
                if problem is None:
                    meta = json.dumps({"path": str(path), "class": Path(path).parent.name}).encode()
                    writer.write({"__key__": f"{index:08d}", "jpg": data, "cls": b"0", "json": meta})
    return time.perf_counter() - started


CONTENDERS = {
    "tar_cf": ("tar cf", tar_cf),
    "tar_cf_sha256": ("tar cf && sha256sum", tar_cf_sha256),
    "lg_shard_1": ("lg-shard --workers 1", lambda p, f, o: lg_shard(p, f, o, 1)),
    "lg_shard_n": (None, None),  # filled in main() with the worker count
    "writer_ours": ("writer: ours (1 process)", lambda p, f, o: writer_loop(p, f, o, ShardTarWriter)),
    "writer_webdataset": (
        "writer: webdataset TarWriter",
        lambda p, f, o: writer_loop(p, f, o, lambda path: wds.TarWriter(str(path), encoder=False)),
    ),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--workers", type=int, default=cpu_count())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=Path("runs/bench"))
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/dev/shm/layergraft-shard-bench")
        if Path("/dev/shm").is_dir()
        else Path("runs/bench/shard_bench_out"),
    )
    args = parser.parse_args()
    photos = args.data / f"photos{args.images}"
    files = make_photos(photos, args.images)
    megabytes = warm_page_cache(files) / 1e6
    contenders = dict(CONTENDERS)
    contenders["lg_shard_n"] = (
        f"lg-shard --workers {args.workers}",
        lambda p, f, o: lg_shard(p, f, o, args.workers),
    )

    seconds = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, (_, run) in contenders.items():
            shutil.rmtree(args.out, ignore_errors=True)
            args.out.mkdir(parents=True)
            os.sync()
            seconds[name].append(run(photos, files, args.out))
            shutil.rmtree(args.out)
    mb_per_s = {name: megabytes / statistics.median(values) for name, values in seconds.items()}
    result = {
        "bench": "shard",
        "images": len(files),
        "megabytes": round(megabytes, 1),
        "workers": args.workers,
        "out": str(args.out),
        "machine": f"{platform.machine()} {cpu_count()} CPUs",
        "mb_per_s": {k: round(v, 1) for k, v in mb_per_s.items()},
        "seconds": {k: [round(v, 3) for v in values] for k, values in seconds.items()},
        "lg_shard_1_vs_tar": round(mb_per_s["lg_shard_1"] / mb_per_s["tar_cf"], 3),
        "lg_shard_n_vs_tar": round(mb_per_s["lg_shard_n"] / mb_per_s["tar_cf"], 3),
        "writer_ours_vs_webdataset": round(mb_per_s["writer_ours"] / mb_per_s["writer_webdataset"], 3),
        "target": {"lg_shard_vs_tar": 0.8},
    }
    print(f"{'contender':<32}{'MB/s':>8}{'x tar cf':>10}   seconds")
    for name, (label, _) in contenders.items():
        runs = ", ".join(f"{v:.2f}" for v in seconds[name])
        print(f"{label:<32}{mb_per_s[name]:>8.0f}{mb_per_s[name] / mb_per_s['tar_cf']:>10.2f}   {runs}")
    print(
        f"lg-shard / tar cf = {result['lg_shard_1_vs_tar']:.2f}x (1 worker), "
        f"{result['lg_shard_n_vs_tar']:.2f}x ({args.workers} workers), target >= 0.8; "
        f"our writer / webdataset's = {result['writer_ours_vs_webdataset']:.2f}x"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
