"""Failures as a cluster meets them, in real processes: after any error every process exits, non-zero,
within DEADLINE; checkpoints are verified and a damaged one falls back; a diverging run keeps a
checkpoint that resumes finite; vanished, truncated and damaged data is counted or stops the run."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.core.checkpoint import CHECKSUMS, latest_tag, tag_of
from pretrain.core.weights import consolidated_state_dict
from pretrain.data.manifest import Manifest, ShardInfo
from pretrain.data.shard_tar import ShardTarWriter, read_shard
from tests.conftest import REPO, TRAIN_ENV, pretrain, pretrain_command, run_cli, scalar_values

pytestmark = pytest.mark.dist

DEADLINE = 60  # seconds from a fault to the exit of every process: the bound the README promises
COMMON = ["method=mae", "deepspeed.config=ds_configs/zero1.json", "deepspeed.precision=fp32"]


@pytest.fixture(scope="module")
def manifest(demo_shards):
    return demo_shards / "train.json"


def rewrite_split(manifest_path, out, change=lambda sample: sample, name=None):
    """A copy of a split in `out` (shards and manifest), each sample passed through `change`."""
    source = Manifest.load(manifest_path)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for url, shard in zip(source.urls, source.shards):
        with ShardTarWriter(out / shard.name) as writer:
            for sample in read_shard(url):
                writer.write(change(sample))
        shards.append(ShardInfo(shard.name, shard.num_samples, writer.bytes, writer.sha256.hexdigest()))
    copy = Manifest(source.split, source.classes, source.num_samples, shards)
    copy.save(out / (name or f"{source.split}.json"))
    return out / (name or f"{source.split}.json")


def start(command, log, env=None):
    """Popen `command` with stdout and stderr to the file `log` (a pipe nobody reads would block it)."""
    return subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV, **(env or {})},
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(log, text, processes, timeout=300):
    deadline = time.monotonic() + timeout
    while text not in Path(log).read_text():
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{Path(log).read_text()[-3000:]}"
        assert any(p.poll() is None for p in processes), (
            f"ended before {text!r}:\n{Path(log).read_text()[-3000:]}"
        )
        time.sleep(0.1)


def exits_within(processes, seconds):
    """Wait for every process; fail (after killing them) if one outlives `seconds`. Their exit codes."""
    deadline = time.monotonic() + seconds
    try:
        return [p.wait(timeout=max(0.1, deadline - time.monotonic())) for p in processes]
    except subprocess.TimeoutExpired:
        for p in processes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f"a process was still running {seconds} s after the fault")


def plain_ranks(command, logs, port):
    """The ranks of a 2-process job as plain processes, as lg-submit runs them (no launcher)."""
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    return [start(command, log, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r, log in enumerate(logs)]


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def train_command(run_dir, manifest, *overrides):
    return pretrain_command(run_dir, manifest, *COMMON, *overrides, nproc=1)


def test_an_error_after_the_loader_started_ends_every_plain_process(manifest, tmp_path):
    """Shards whose images do not decode: both ranks raise in the loader's workers and exit 1 within the
    deadline (before, the workers, which ignore SIGTERM, held the exit for ever)."""
    broken = rewrite_split(manifest, tmp_path / "shards", lambda s: {**s, "jpg": b"\xff\xd8 not a jpeg"})
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    ranks = plain_ranks(train_command(tmp_path / "run", broken, "run.max_steps=5"), logs, free_port())
    wait_for(logs[0], "no sample of a batch decodes", ranks)
    assert exits_within(ranks, DEADLINE) == [1, 1]
    assert "lg-pretrain: failed: RuntimeError" in logs[0].read_text()


def test_killing_one_of_two_plain_processes_ends_the_other(manifest, tmp_path):
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    ranks = plain_ranks(train_command(tmp_path / "run", manifest, "run.max_steps=400"), logs, free_port())
    wait_for(logs[0], "step 2/", ranks)
    os.killpg(ranks[1].pid, signal.SIGKILL)
    code = exits_within(ranks[:1], DEADLINE)[0]
    assert code != 0, logs[0].read_text()[-3000:]


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory):
    """4 uninterrupted steps, a checkpoint every 2: the run the recoveries below must equal."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    result = pretrain(run_dir, manifest, *COMMON, "run.max_steps=4", "run.save_every=2", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/4 " in result.stderr, "the console counts to run.max_steps, not to the schedule's end"
    return run_dir


def same_weights(run_a, run_b, step):
    a, b = (consolidated_state_dict(run / "ckpt", tag_of(step)) for run in (run_a, run_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_flipped_byte_in_latest_falls_back_to_the_previous_tag_and_ends_as_the_run_would(
    reference, manifest, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    weights = run_dir / "ckpt" / tag_of(4) / "mp_rank_00_model_states.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    result = pretrain(run_dir, manifest, *COMMON, "run.max_steps=4", "run.save_every=2", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"checkpoint {run_dir / 'ckpt' / tag_of(4)} is damaged: mp_rank_00_model_states.pt does not match"
        in result.stderr
    )
    assert f"falling back to checkpoint {run_dir / 'ckpt' / tag_of(2)}" in result.stderr
    assert f"resumed {run_dir / 'ckpt' / tag_of(2)} at step 2" in result.stderr
    assert (run_dir / "ckpt" / f"{tag_of(4)}.corrupt").is_dir(), "the damaged tag is kept aside"
    assert same_weights(reference, run_dir, 4)


def test_no_intact_checkpoint_is_a_one_line_error(reference, manifest, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for step in (2, 4):
        (run_dir / "ckpt" / tag_of(step) / "run_state.json").write_text('{"step": ')  # half written
    result = pretrain(run_dir, manifest, *COMMON, "run.max_steps=4", nproc=1)
    assert result.returncode == 2
    assert "lg-pretrain: error: no intact checkpoint in" in result.stderr
    assert "run_state.json has 9 bytes" in result.stderr and "Traceback" not in result.stderr
    export = run_cli("pretrain.export", run_dir, tmp_path / "encoder.pth", env=TRAIN_ENV)
    assert export.returncode == 2 and "cannot be used: run_state.json has 9 bytes" in export.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_a_full_disk_stops_with_latest_on_the_previous_tag_and_a_resume_is_exact(
    reference, manifest, tmp_path
):
    disk = tmp_path / "disk"
    disk.mkdir()
    tag_bytes = sum(p.stat().st_size for p in (reference / "ckpt" / tag_of(2)).iterdir())
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={int(tag_bytes * 1.5)}", "tmpfs", str(disk)], check=True
    )
    try:
        run_dir = disk / "run"
        full = pretrain(run_dir, manifest, *COMMON, "run.max_steps=4", "run.save_every=2", nproc=1)
        assert full.returncode == 2, full.stderr[-3000:]
        assert f"lg-pretrain: error: the disk holding {run_dir / 'ckpt'} is full" in full.stderr
        assert latest_tag(run_dir / "ckpt") == tag_of(2)
        subprocess.run(["mount", "-o", f"remount,size={tag_bytes * 4}", str(disk)], check=True)
        resumed = pretrain(run_dir, manifest, *COMMON, "run.max_steps=4", "run.save_every=2", nproc=1)
        assert resumed.returncode == 0 and "at step 2" in resumed.stderr, resumed.stderr[-3000:]
        assert same_weights(reference, run_dir, 4)
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_diverging_run_keeps_a_checkpoint_that_resumes_finite_and_its_exit_code_survives_the_launcher(
    manifest, tmp_path
):
    """An absurd peak lr reached after one warm-up step: the checkpoint written from the blown-up weights
    is set aside, `latest` goes back to the one before, and resuming from it at a lower lr trains.
    Under lg-torchrun (2 processes) the exit code stays 3."""
    run_dir = tmp_path / "run"
    steps = ["optim.base_lr=1e12", "optim.warmup_epochs=0.03", "run.save_every=1", "run.max_steps=30"]
    command = [
        sys.executable,
        "-m",
        "pretrain.launch",
        "--standalone",
        "--nproc_per_node",
        "2",
        *pretrain_command(run_dir, manifest, *COMMON, *steps, nproc=1)[1:],
    ]
    diverged = subprocess.run(
        command, cwd=REPO, env={**os.environ, **TRAIN_ENV}, capture_output=True, text=True, timeout=600
    )
    assert diverged.returncode == 3, diverged.stderr[-3000:]
    assert "lg-pretrain: stopped:" in diverged.stderr
    kept = latest_tag(run_dir / "ckpt")
    weights = consolidated_state_dict(run_dir / "ckpt", kept)
    assert all(torch.isfinite(w).all() and w.abs().max() < 1e3 for w in weights.values()), kept
    assert any(p.name.endswith(".diverged") for p in (run_dir / "ckpt").iterdir())
    step = int(kept[4:])
    resumed = pretrain(
        run_dir,
        manifest,
        *COMMON,
        *steps[:3],
        f"run.max_steps={step + 3}",
        "run.lr_factor=1e-15",
        f"run.resume_tag={kept}",
        "run.skip_batches=2",
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping the batches of 2 steps" in resumed.stderr
    losses = scalar_values(run_dir, "loss")[-3:]
    assert all(0 < loss < 10 for loss in losses), losses


def test_vanished_shards_stop_the_run_with_an_error_naming_the_storage(manifest, tmp_path):
    storage = tmp_path / "storage"
    copied = rewrite_split(manifest, storage)
    log = tmp_path / "run.log"
    process = start(train_command(tmp_path / "run", copied, "run.max_steps=400", "run.save_every=2"), log)
    wait_for(log, "saved checkpoint", [process])
    for shard in storage.glob("*.tar"):
        shard.unlink()
    assert exits_within([process], DEADLINE) == [1]
    text = log.read_text()
    assert f"shards gave no sample (storage {storage})" in text and "the last checkpoint stays" in text
    assert latest_tag(tmp_path / "run" / "ckpt") is not None


def truncate(shard, keep_fraction=0.5):
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep_fraction)])


def loader_counts(manifest_path, **options):
    """(images read, samples lost, shards skipped) of one epoch of a split, in this process."""
    from pretrain.data.loader import make_loader

    loader = make_loader(
        manifest_path, 50, img_size=32, mode="epoch", num_workers=0, rank=0, world_size=1, **options
    )
    images = sum(len(batch["labels"]) for batch in loader.epoch(0))
    return images, loader.lost_samples, loader.skipped_shards


def test_truncated_and_bad_header_shards_are_counted_as_lost(manifest, tmp_path):
    copied = rewrite_split(manifest, tmp_path / "shards")
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    truncate(shards[0])
    data = bytearray(shards[1].read_bytes())
    data[512 * 7 + 100] ^= 0xFF  # inside the header of a later member: its checksum fails
    shards[1].write_bytes(bytes(data))
    listed = Manifest.load(copied)
    readable = 0
    for shard in shards[:2]:
        try:
            for _ in read_shard(shard):
                readable += 1
        except Exception:
            pass
    damaged = sum(s.num_samples for s in listed.shards[:2])
    assert 0 < readable < damaged
    images, lost, skipped = loader_counts(copied, verify_shards=False)  # read up to the damage
    assert (images, lost, skipped) == (listed.num_samples - damaged + readable, damaged - readable, 0)
    images, lost, skipped = loader_counts(copied)  # their checksums fail: skipped whole
    assert (images, lost, skipped) == (listed.num_samples - damaged, damaged, 2)


def test_a_shard_whose_checksum_mismatches_is_skipped_and_counted(manifest, tmp_path):
    """A flipped byte inside an image: the JPEG may still decode (it trains on wrong pixels, uncounted,
    without the check); with it the shard is skipped and its samples counted as lost."""
    copied = rewrite_split(manifest, tmp_path / "shards")
    shard = sorted((tmp_path / "shards").glob("*.tar"))[3]
    data = bytearray(shard.read_bytes())
    data[data.index(b"\xff\xd8\xff", len(data) // 3) + 600] ^= 0x10  # inside a JPEG (1,032 bytes each)
    shard.write_bytes(bytes(data))
    listed = Manifest.load(copied)
    assert loader_counts(copied, verify_shards=False)[1:] == (0, 0)
    images, lost, skipped = loader_counts(copied)
    assert (images, lost, skipped) == (
        listed.num_samples - listed.shards[3].num_samples,
        listed.shards[3].num_samples,
        1,
    )


def test_lost_samples_and_skipped_shards_reach_tensorboard(manifest, tmp_path):
    """Every shard but one cut short: each draw of a damaged one is skipped (checksum) and counted."""
    copied = rewrite_split(manifest, tmp_path / "shards")
    for shard in sorted((tmp_path / "shards").glob("*.tar"))[1:]:
        truncate(shard, 0.6)
    result = pretrain(tmp_path / "run", copied, *COMMON, "run.max_steps=2", "data.max_bad_shards=0", nproc=1)
    assert result.returncode == 0, result.stderr[-3000:]
    lost, skipped = (
        scalar_values(tmp_path / "run", f"data/{name}") for name in ("lost_samples", "skipped_shards")
    )
    assert lost[-1] >= 50 and skipped[-1] >= 2, (lost, skipped)
    assert "does not match" not in result.stderr and "SHA-256 differs from the manifest's" in result.stderr


def test_an_unwritable_run_dir_or_export_path_is_a_one_line_error_before_the_work(
    reference, manifest, tmp_path
):
    result = pretrain("/proc/lg-run", manifest, *COMMON, "run.max_steps=1", nproc=1)
    assert result.returncode == 2 and "run.dir /proc/lg-run: cannot write there" in result.stderr, (
        result.stderr
    )
    export = run_cli("pretrain.export", reference, "/proc/lg-export/encoder.pth", env=TRAIN_ENV)
    assert export.returncode == 2 and "/proc/lg-export/encoder.pth: cannot write there" in export.stderr
    folder = pretrain(tmp_path / "run", manifest.parent, *COMMON, "run.max_steps=1", nproc=1)
    assert folder.returncode == 2 and "is a folder" in folder.stderr and "Traceback" not in folder.stderr


def test_a_silent_peer_is_caught_by_the_collective_timeout(manifest, tmp_path):
    """A rank that stops answering (SIGSTOP: a hung node) instead of dying: the other waits at most
    run.collective_timeout in its collective, then exits non-zero."""
    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    command = train_command(tmp_path / "run", manifest, "run.max_steps=400", "run.collective_timeout=10")
    ranks = plain_ranks(command, logs, free_port())
    wait_for(logs[0], "step 2/", ranks)
    os.killpg(ranks[1].pid, signal.SIGSTOP)
    try:
        assert exits_within(ranks[:1], 10 + DEADLINE)[0] != 0
    finally:
        os.killpg(ranks[1].pid, signal.SIGKILL)


def test_a_partial_val_set_fails_lg_eval_unless_allowed(demo_shards, tmp_path):
    import timm

    encoder = tmp_path / "encoder.pth"
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=0)
    torch.save({"model": model.state_dict()}, encoder)
    val = rewrite_split(demo_shards / "val.json", tmp_path / "val")
    truncate(sorted((tmp_path / "val").glob("*.tar"))[0])
    common = [
        "knn",
        encoder,
        "--train",
        demo_shards / "train.json",
        "--val",
        val,
        "--arch",
        "vit_tiny",
        "--img-size",
        32,
        "--patch-size",
        8,
        "--workers",
        1,
        "--out",
        tmp_path / "result.json",
    ]
    refused = run_cli("pretrain.eval", *common)
    assert refused.returncode == 2 and "--allow-partial" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "result.json").exists()
    allowed = run_cli("pretrain.eval", *common, "--allow-partial")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["partial"] and result["samples"]["val"]["read"] < result["samples"]["val"]["listed"] == 359
    finetune = run_cli(
        "pretrain.eval",
        "finetune",
        encoder,
        "--train",
        demo_shards / "train.json",
        "--val",
        val,
        "--arch",
        "vit_tiny",
        "--img-size",
        32,
        "--patch-size",
        8,
        "--config",
        REPO / "configs" / "finetune_demo.yaml",
        "run.max_steps=1",
        "deepspeed.micro_batch_size=16",
        f"run.dir={tmp_path / 'ft'}",
        env=TRAIN_ENV,
    )
    assert finetune.returncode == 2, finetune.stderr[-2000:]
    assert (
        "images the manifest lists could be read" in finetune.stderr and "--allow-partial" in finetune.stderr
    )
    assert not (tmp_path / "ft" / "eval_finetune.json").exists() and (tmp_path / "ft" / "ckpt").is_dir()


def test_lg_eval_checks_its_inputs_and_outputs_before_the_work(demo_shards, tmp_path):
    common = ["knn", tmp_path / "missing.pth", "--arch", "vit_tiny", "--train", demo_shards]
    missing_val = run_cli("pretrain.eval", *common, "--val", tmp_path / "nowhere.json")
    assert (
        missing_val.returncode == 2
        and f"--val {tmp_path / 'nowhere.json'} does not exist" in missing_val.stderr
    )
    unwritable = run_cli("pretrain.eval", *common, "--val", demo_shards, "--out", "/proc/lg-eval/result.json")
    assert (
        unwritable.returncode == 2
        and "--out /proc/lg-eval/result.json: cannot write there" in unwritable.stderr
    )
    zero = run_cli(
        "pretrain.eval",
        "linear",
        tmp_path / "e.pth",
        "--train",
        demo_shards,
        "--val",
        demo_shards,
        "--fraction",
        0,
    )
    assert zero.returncode == 2 and "--fraction 0.0: must be in (0, 1]" in zero.stderr


def test_png_webp_and_jpeg_members_decode(demo_shards, tmp_path):
    import io
    import itertools

    from PIL import Image

    from pretrain.data.loader import make_loader
    from pretrain.data.views import decode_image

    formats = {"png": "PNG", "webp": "WEBP", "jpeg": "JPEG"}

    turns = itertools.cycle(formats)

    def reencode(sample):
        extension = next(turns)
        out = io.BytesIO()
        Image.open(io.BytesIO(sample["jpg"])).save(out, format=formats[extension], lossless=True)
        return {**{k: v for k, v in sample.items() if k != "jpg"}, extension: out.getvalue()}

    copied = rewrite_split(demo_shards / "val.json", tmp_path / "val", reencode)
    members = {
        name.rsplit(".", 1)[1]
        for shard in (tmp_path / "val").glob("*.tar")
        for sample in read_shard(shard)
        for name in [f"x.{k}" for k in sample if not k.startswith("_")]
    }
    assert {"png", "webp", "jpeg"} <= members and "jpg" not in members
    loader = make_loader(copied, 64, img_size=32, mode="epoch", num_workers=0, rank=0, world_size=1)
    original = make_loader(
        demo_shards / "val.json", 64, img_size=32, mode="epoch", num_workers=0, rank=0, world_size=1
    )
    ours, theirs = list(loader.epoch(0)), list(original.epoch(0))
    assert loader.bad_samples == 0 and sum(len(b["labels"]) for b in ours) == 359
    first = next(read_shard(next(iter(sorted((tmp_path / "val").glob("*.tar"))))))
    assert decode_image(first["png"]).shape[0] == 3
    assert torch.equal(torch.cat([b["labels"] for b in ours]), torch.cat([b["labels"] for b in theirs]))


def test_a_second_run_in_the_same_run_dir_is_refused_naming_the_first(manifest, tmp_path):
    run_dir = tmp_path / "run"
    log = tmp_path / "first.log"
    first = start(train_command(run_dir, manifest, "run.max_steps=400"), log)
    wait_for(log, "step 1/", [first])
    second = pretrain(run_dir, manifest, *COMMON, "run.max_steps=400", nproc=1, timeout=DEADLINE * 3)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=DEADLINE)
    assert second.returncode == 2, second.stderr[-3000:]
    assert (
        f"{run_dir} is in use by another run (host " in second.stderr and f"pid {first.pid}" in second.stderr
    )
    again = pretrain(run_dir, manifest, *COMMON, "run.max_steps=1", nproc=1)
    assert again.returncode == 0, "the lock went with the killed process"


def test_resume_refuses_changes_that_make_it_inexact_and_accepts_a_moved_run(
    reference, manifest, demo_shards, tmp_path
):
    moved = tmp_path / "moved"
    shutil.copytree(reference, moved)
    data = rewrite_split(manifest, tmp_path / "data")  # the same shards, elsewhere
    resumed = pretrain(moved, data, *COMMON, "run.max_steps=4", nproc=1)
    assert resumed.returncode == 0 and f"resumed {moved / 'ckpt' / tag_of(4)}" in resumed.stderr, (
        resumed.stderr
    )
    workers = pretrain(moved, manifest, *COMMON, "run.max_steps=6", "data.num_workers=2", nproc=1)
    assert workers.returncode == 2 and "data.num_workers: 1 -> 2" in workers.stderr, workers.stderr[-2000:]
    other = pretrain(moved, demo_shards / "val.json", *COMMON, "run.max_steps=6", nproc=1)
    assert other.returncode == 2 and "holds other shards than the run was trained on" in other.stderr
    ds = tmp_path / "zero.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    stage = pretrain(moved, manifest, *COMMON, "run.max_steps=6", f"deepspeed.config={ds}", nproc=1)
    assert stage.returncode == 2 and "zero_optimization.stage: 1 -> 2" in stage.stderr, stage.stderr[-2000:]


def test_a_bad_config_keeps_exit_code_2_under_lg_torchrun(manifest, tmp_path):
    command = [
        sys.executable,
        "-m",
        "pretrain.launch",
        "--standalone",
        "--nproc_per_node",
        "2",
        *pretrain_command(tmp_path, manifest, "optim.base_lr=-1", nproc=1)[1:],
    ]
    result = subprocess.run(
        command, cwd=REPO, env={**os.environ, **TRAIN_ENV}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2 and "config key optim.base_lr" in result.stderr, result.stderr[-2000:]
    plain = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *command[3:]],
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert plain.returncode == 1, "torchrun itself loses the code (why lg-torchrun exists)"


def test_checksums_are_recorded_for_every_file_of_a_tag(reference):
    tag_dir = reference / "ckpt" / tag_of(4)
    recorded = json.loads((tag_dir / CHECKSUMS).read_text())
    assert set(recorded) == {p.name for p in tag_dir.iterdir() if p.name != CHECKSUMS}
    assert "run_state.json" in recorded and all(len(v["sha256"]) == 64 for v in recorded.values())
