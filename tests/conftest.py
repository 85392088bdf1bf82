"""Shared fixtures: the embedded demo data set, its shards, and helpers that write odd images."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.demo_data import write_demo_data

REPO = Path(__file__).resolve().parents[1]


# The longest test files, longest first. `make test` runs two pytest-xdist workers, each test file whole on
# one of them (so a module's fixtures train once): started first, the demo (~7 min) runs beside the rest
# instead of after it.
LONGEST_FIRST = [
    "test_demo_data.py",
    "test_train_dist.py",
    "test_protocols.py",
    "test_slurm.py",
    "test_failures.py",
    "test_methods_dist.py",
]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


def run_cli(module, *args, timeout=300, **kwargs):
    """Run `python -m module args...` as a real process; return the CompletedProcess."""
    env = {**os.environ, **kwargs.pop("env", {}), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def jpeg_bytes(size=(40, 30), mode="RGB", seed=0, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "CMYK": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)
    out = io.BytesIO()
    image.save(out, format=fmt, quality=90)
    return out.getvalue()


def smooth_jpeg(size=(512, 384)):
    """A photo-like JPEG (smooth colour waves): what scaled decoding and the colour steps are measured on."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / 40.0
    pixels = np.stack([np.sin(x + y), np.cos(0.7 * x - y), np.sin(0.5 * x * y / 10)], -1) * 110 + 128
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def psnr(a, b):
    """PSNR (dB) of two uint8-valued images (any array-likes torch takes), capped at 100 for identical
    ones."""
    mse = torch.mean((torch.as_tensor(a).double() - torch.as_tensor(b).double()) ** 2).item()
    return 10 * np.log10(255**2 / max(mse, 1e-10))


def write_file(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def read_manifest(out, split):
    return json.loads((Path(out) / f"{split}.json").read_text())


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """The demo ImageFolder (train/ and val/ of 10 digit classes)."""
    root = tmp_path_factory.mktemp("demo") / "digits"
    write_demo_data(root)
    return root


@pytest.fixture(scope="session")
def demo_shards(demo_images, tmp_path_factory):
    """The demo data sharded with 50 images per shard (29 train shards, 8 val shards)."""
    out = tmp_path_factory.mktemp("demo_shards")
    for split in ("train", "val"):
        result = run_cli(
            "data_prep.shard",
            demo_images,
            out,
            "--split",
            split,
            "--layout",
            "imagefolder",
            "--max-per-shard",
            50,
            "--workers",
            2,
        )
        assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One `python -m pretrain.demo` (the README's `make demo`) for every test that reads what it wrote:
    (its workdir, the CompletedProcess)."""
    workdir = tmp_path_factory.mktemp("demo_run") / "demo"
    result = run_cli("pretrain.demo", "--workdir", workdir, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    return workdir, result


# Every method's model at its smallest (a ViT-Tiny of 8-px patches on 32-px images, narrow heads), for the
# tests that build objectives in this process.
TINY = [
    "model.arch=vit_tiny",
    "model.patch_size=8",
    "data.img_size=32",
    "moco.mlp_dim=64",
    "moco.out_dim=16",
    "mae.decoder_dim=32",
    "mae.decoder_depth=1",
    "mae.decoder_heads=2",
    "simclr.mlp_dim=64",
    "byol.mlp_dim=64",
    "simsiam.dim=64",
    "simsiam.pred_dim=16",
    "simmim.mask_patch_size=16",
    "conmim.mask_patch_size=16",
    "cmae.feature_decoder_dim=32",
    "cmae.mlp_dim=64",
    "finetune.num_classes=4",
]


# Multi-process training on the CPU: DeepSpeed's CPU accelerator, one thread per process, and compiled
# ops cached inside the venv (a stale lock in a shared cache can hang torch).
TRAIN_ENV = {
    "DS_ACCELERATOR": "cpu",
    "OMP_NUM_THREADS": "1",
    "TORCH_EXTENSIONS_DIR": str(Path(sys.prefix) / "torch_extensions"),
}
TINY_RUN = [
    "model.patch_size=8",
    "deepspeed.micro_batch_size=16",
    "data.num_workers=1",
    "data.shuffle_buffer=100",
    "moco.mlp_dim=128",
    "moco.out_dim=32",
    "run.log_every=1",
    "run.image_every=0",
    "run.save_every=1000",
    "optim.epochs=5",
    "optim.warmup_epochs=0.25",
]


def pretrain_command(run_dir, train_manifest, *overrides, nproc=2):
    launcher = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] if nproc > 1 else []
    )
    return [
        sys.executable,
        *launcher,
        "-m",
        "pretrain.train",
        "--config",
        str(REPO / "configs" / "demo.yaml"),
        f"run.dir={run_dir}",
        f"data.train={train_manifest}",
        *TINY_RUN,
        *map(str, overrides),
    ]


def pretrain(run_dir, train_manifest, *overrides, nproc=2, timeout=600):
    """Run lg-pretrain to completion in real processes; return the CompletedProcess."""
    return subprocess.run(
        pretrain_command(run_dir, train_manifest, *overrides, nproc=nproc),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV},
    )


def tensorboard(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "images": 0, "tensors": 0}
    )
    events.Reload()
    return events


def scalar_values(run_dir, tag):
    return [event.value for event in tensorboard(run_dir).Scalars(tag)]


# ZeRO-3 with every parameter partitioned (the shipped config keeps parameters under 1e5 elements whole
# on every rank, which at toy sizes is all of them and would hide a parameter that is not gathered).
ZERO3_ALL_PARTITIONED = {
    "zero_optimization": {
        "stage": 3,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 10000000,
        "stage3_prefetch_bucket_size": 10000000,
        "stage3_param_persistence_threshold": 0,
    }
}


@pytest.fixture(scope="session")
def zero3_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds_configs") / "zero3_all_partitioned.json"
    path.write_text(json.dumps(ZERO3_ALL_PARTITIONED))
    return path
