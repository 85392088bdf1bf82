"""What verifying costs: SHA-256 of checkpoint files and shards against writing and decoding them.

    python -m bench.checksum [--megabytes 512] [--repeats 3] [--dir /tmp]

(a) torch.save of float32 tensors of that size (a checkpoint file, as DeepSpeed writes them), to --dir;
(b) sha256_of_file of the file written (what pretrain.core.checkpoint records before `latest` moves and
    checks on resume), from the page cache;
(c) the same for one lg-shard shard of the demo digits against decoding its images (the loader hashes a
    shard before reading it: data.verify_shards).
Prints a table and a JSON line; medians over the repeats.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.photos import cpu_count
from pretrain import demo
from pretrain.core.files import sha256_of_file
from pretrain.data.shard_tar import image_bytes, read_shard
from pretrain.data.views import decode_image


def timed(function, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    args = parser.parse_args(argv)
    tensors = {f"w{i}": torch.randn(args.megabytes * 2**20 // 4 // 16) for i in range(16)}
    path = args.dir / "bench_checksum.pt"
    save_s = timed(lambda: torch.save(tensors, path), args.repeats)
    size = path.stat().st_size
    hash_s = timed(lambda: sha256_of_file(path), args.repeats)
    path.unlink()

    shards = demo.prepare_data(args.dir / "bench_checksum_data")
    shard = sorted(shards.glob("train-*.tar"))[0]
    samples = list(read_shard(shard))
    decode_s = timed(lambda: [decode_image(image_bytes(s)) for s in samples], args.repeats)
    shard_hash_s = timed(lambda: sha256_of_file(shard), args.repeats)
    result = {
        "bench": "checksum",
        "machine": f"{platform.machine()} {cpu_count()} CPUs",
        "torch": torch.__version__,
        "checkpoint_mb": round(size / 1e6, 1),
        "save_mb_per_s": round(size / 1e6 / save_s, 1),
        "sha256_mb_per_s": round(size / 1e6 / hash_s, 1),
        "hash_vs_save": round(hash_s / save_s, 3),
        "shard_kb": round(shard.stat().st_size / 1e3, 1),
        "shard_images": len(samples),
        "shard_hash_ms": round(1e3 * shard_hash_s, 2),
        "shard_decode_ms": round(1e3 * decode_s, 2),
        "hash_vs_decode": round(shard_hash_s / decode_s, 4),
    }
    print(f"{'work':<44}{'seconds':>10}{'MB/s':>10}")
    print(
        f"{'(a) torch.save, ' + str(round(size / 1e6)) + ' MB':<44}{save_s:>10.3f}"
        f"{result['save_mb_per_s']:>10.0f}"
    )
    print(f"{'(b) sha256 of that file':<44}{hash_s:>10.3f}{result['sha256_mb_per_s']:>10.0f}")
    print(f"{'(c) sha256 of a shard (' + str(len(samples)) + ' images)':<44}{shard_hash_s:>10.4f}")
    print(f"{'    decoding its images':<44}{decode_s:>10.4f}")
    print(
        f"checkpoint: hashing costs {100 * result['hash_vs_save']:.0f} % of writing; shard: hashing costs "
        f"{100 * result['hash_vs_decode']:.1f} % of decoding"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
