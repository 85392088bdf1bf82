"""lg-pretrain for real: the DeepSpeed engine in two gloo processes on the embedded digits."""

import functools
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch

from pretrain.core.checkpoint import latest_tag, tag_of
from pretrain.core.weights import consolidated_state_dict
from tests.conftest import REPO, TRAIN_ENV, pretrain, pretrain_command, run_cli, scalar_values, tensorboard

pytestmark = pytest.mark.dist

# What each stage's run also exercises besides the stage itself.
STAGE_EXTRAS = {
    0: ["deepspeed.precision=fp32"],
    1: ["deepspeed.precision=fp32", "deepspeed.grad_accum=2", "optim.clip_grad=1.0"],
    2: ["deepspeed.precision=bf16"],
    3: ["deepspeed.precision=fp32", "model.grad_checkpointing=true"],
}


@pytest.fixture(scope="module")
def manifest(demo_shards):
    return demo_shards / "train.json"


def knn_monitor(every, manifest):
    """Overrides that turn the online kNN monitor on, on the whole demo train and val splits."""
    return [
        f"run.knn_every={every}",
        f"data.knn_train={manifest}",
        f"data.knn_val={manifest.with_name('val.json')}",
    ]


@pytest.fixture(scope="module")
def stage_run(manifest, tmp_path_factory, zero3_config):
    """Run (once per module) 2 steps of a method under a ZeRO stage, a checkpoint after each step.
    Stage 3 partitions every parameter (see tests/conftest.py); its MoCo v3 run has the kNN monitor on."""

    @functools.cache
    def run(stage, method):
        run_dir = tmp_path_factory.mktemp(f"zero{stage}_{method}")
        ds_config = zero3_config if stage == 3 else f"ds_configs/zero{stage}.json"
        monitor = knn_monitor(2, manifest) if (stage, method) == (3, "mocov3") else []
        result = pretrain(
            run_dir,
            manifest,
            f"method={method}",
            f"deepspeed.config={ds_config}",
            "run.max_steps=2",
            "run.save_every=1",
            "run.keep_last=2",
            *STAGE_EXTRAS[stage],
            *monitor,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        return run_dir

    return run


def client_state(run_dir, step):
    """Rank 0's model-states file of a tag: DeepSpeed keeps the client state there (named differently
    under ZeRO-3, where it holds no module weights)."""
    tag_dir = run_dir / "ckpt" / tag_of(step)
    path = next(
        p
        for p in (
            tag_dir / "mp_rank_00_model_states.pt",
            tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt",
        )
        if p.is_file()
    )
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.mark.parametrize("method", ["mae", "mocov3"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_trains(stage_run, stage, method):
    run_dir = stage_run(stage, method)
    losses = scalar_values(run_dir, "loss")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert latest_tag(run_dir / "ckpt") == tag_of(2) and (run_dir / "ckpt" / tag_of(1)).is_dir()
    assert (run_dir / "config.yaml").is_file() and (run_dir / "ds_config.json").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_momentum_branch_follows_the_online_weights(stage_run, stage):
    """target(2) = m * target(1) + (1 - m) * online(2), with ZeRO-2 and with ZeRO-3-partitioned online
    weights."""
    run_dir = stage_run(stage, "mocov3")
    before, after = client_state(run_dir, 1)["objective"], client_state(run_dir, 2)["objective"]
    # The EMA reads the engine's module weights: bf16 in the ZeRO-2 run (the module states file has them
    # whole), fp32 in the ZeRO-3 run (consolidated from the partitions).
    module = (
        client_state(run_dir, 2)["module"]
        if stage == 2
        else consolidated_state_dict(run_dir / "ckpt", tag_of(2))
    )
    online = {name: tensor.float() for name, tensor in module.items()}
    m = after["momentum"]
    assert 0.99 < m < 1
    moved = 0
    for name, target in after["momentum_branch"].items():
        if "running_" in name or "num_batches" in name:
            continue  # BatchNorm statistics are not averaged (as in MoCo v3)
        expected = m * before["momentum_branch"][name] + (1 - m) * online[name]
        assert torch.allclose(target, expected, atol=1e-6), name
        moved += not torch.equal(target, before["momentum_branch"][name])
    assert moved > 100, "the EMA must move the momentum branch"


def test_knn_monitor_under_zero3_measures_the_whole_encoder(stage_run, manifest):
    """Every parameter partitioned over 2 ranks, each rank embedding half of the splits: the logged
    kNN top-1 is the one of the consolidated encoder's features on the whole splits."""
    from pretrain.evaluation.features import extract_features
    from pretrain.evaluation.knn import knn_accuracy
    from pretrain.models import create_encoder

    run_dir = stage_run(3, "mocov3")
    logged = {event.step: event.value for event in tensorboard(run_dir).Scalars("eval/knn_top1")}
    assert sorted(logged) == [0, 2]
    encoder = create_encoder("vit_tiny", 32, 8).eval()
    weights = consolidated_state_dict(run_dir / "ckpt", tag_of(2))
    encoder.load_state_dict(
        {name[len("encoder.") :]: value for name, value in weights.items() if name.startswith("encoder.")},
        strict=True,
    )
    (train, train_y), (val, val_y) = (
        extract_features(encoder, manifest.with_name(f"{split}.json"), 32) for split in ("train", "val")
    )
    expected = 100 * knn_accuracy(train["token", -1], train_y, val["token", -1], val_y)
    assert logged[2] == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_export_loads_strictly_into_timm(stage_run, stage, tmp_path):
    run_dir = stage_run(stage, "mae")
    out = tmp_path / "encoder.pth"
    result = run_cli("pretrain.export", run_dir, out)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(out, map_location="cpu")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8)
    model.load_state_dict(state, strict=True)
    consolidated = consolidated_state_dict(run_dir / "ckpt", tag_of(2))
    assert torch.equal(state["blocks.11.mlp.fc2.weight"], consolidated["encoder.blocks.11.mlp.fc2.weight"])


def test_block_checkpointing_under_zero3_gives_the_same_losses(stage_run, manifest, tmp_path, zero3_config):
    plain = pretrain(
        tmp_path / "plain",
        manifest,
        "method=mae",
        f"deepspeed.config={zero3_config}",
        "run.max_steps=2",
        "deepspeed.precision=fp32",
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert scalar_values(tmp_path / "plain", "loss") == scalar_values(stage_run(3, "mae"), "loss")


def process_tree(pid):
    """`pid` and every process below it (torchrun starts its workers in sessions of their own)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, frontier = [pid], [pid]
    while frontier:
        kids = children.get(frontier.pop(), [])
        tree += kids
        frontier += kids
    return tree


def signal_all(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def run_until_checkpoint(command, run_dir, step):
    """Start a training; right after checkpoint `step` is complete, SIGKILL it and all its processes."""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while (
        latest_tag(run_dir / "ckpt") != tag_of(step)
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    signal_all(process_tree(process.pid), signal.SIGSTOP)  # freeze the tree so that no process escapes
    signal_all(process_tree(process.pid), signal.SIGKILL)
    process.wait(timeout=60)
    return process


def test_resume_after_sigkill_is_exact(manifest, tmp_path):
    """fp32, ZeRO-2, 2 processes: 20 steps straight == 10 steps, SIGKILL, resume to 20."""
    common = [
        "method=mae",
        "deepspeed.config=ds_configs/zero2.json",
        "deepspeed.precision=fp32",
        "run.max_steps=20",
        "run.save_every=10",
        "optim.base_lr=2e-3",
    ]
    straight = pretrain(tmp_path / "straight", manifest, *common)
    assert straight.returncode == 0, straight.stderr[-3000:]
    interrupted = tmp_path / "interrupted"
    run_until_checkpoint(pretrain_command(interrupted, manifest, *common), interrupted, 10)
    assert latest_tag(interrupted / "ckpt") == tag_of(10), "killed too late to test anything"
    resumed = pretrain(interrupted, manifest, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {interrupted / 'ckpt' / tag_of(10)} at step 10" in resumed.stderr
    expected = consolidated_state_dict(tmp_path / "straight" / "ckpt", tag_of(20))
    actual = consolidated_state_dict(interrupted / "ckpt", tag_of(20))
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert scalar_values(interrupted, "loss")[-10:] == scalar_values(tmp_path / "straight", "loss")[-10:]


def test_mocov3_resume_restores_the_momentum_branch_exactly_with_the_knn_monitor_on(manifest, tmp_path):
    """6 steps straight without the monitor == 3 steps with it, stop, resume to 6 with it: the monitor
    changes no weight and resuming is exact with it on. The monitor logs from step 0 on."""
    common = [
        "method=mocov3",
        "deepspeed.config=ds_configs/zero2.json",
        "deepspeed.precision=fp32",
        "run.save_every=3",
    ]
    straight = pretrain(tmp_path / "straight", manifest, *common, "run.max_steps=6")
    monitored = [*common, *knn_monitor(2, manifest), "data.knn_per_class=20"]
    first = pretrain(tmp_path / "split", manifest, *monitored, "run.max_steps=3")
    second = pretrain(tmp_path / "split", manifest, *monitored, "run.max_steps=6")
    assert straight.returncode == first.returncode == second.returncode == 0, second.stderr[-3000:]
    knn = tensorboard(tmp_path / "split").Scalars("eval/knn_top1")
    assert [event.step for event in knn] == [0, 2, 4, 6] and all(0 <= event.value <= 100 for event in knn)
    assert "kNN top-1" in first.stderr and "kNN monitor: 200 train and 200 val images" in first.stderr
    expected, actual = client_state(tmp_path / "straight", 6), client_state(tmp_path / "split", 6)
    assert expected["objective"]["momentum"] == actual["objective"]["momentum"]
    for name, tensor in expected["objective"]["momentum_branch"].items():
        assert torch.equal(tensor, actual["objective"]["momentum_branch"][name]), name
    assert expected["module"].keys() == actual["module"].keys()
    assert all(torch.equal(expected["module"][k], actual["module"][k]) for k in expected["module"])


def test_sigterm_checkpoints_and_stops_then_the_same_command_resumes(manifest, tmp_path):
    run_dir = tmp_path / "run"
    command = pretrain_command(
        run_dir,
        manifest,
        "method=mae",
        "deepspeed.config=ds_configs/zero1.json",
        "deepspeed.precision=fp32",
        "run.max_steps=400",
        "run.save_every=2",
    )
    process = subprocess.Popen(
        command,
        cwd=REPO,
        env={**os.environ, **TRAIN_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    # Four checkpoints, so that keep_last has pruned one.
    while (
        int((latest_tag(run_dir / "ckpt") or "step0")[4:]) < 8
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert "stopped at step" in stderr and "on signal 15" in stderr, stderr[-3000:]
    stopped_at = int(stderr.split("stopped at step ")[1].split()[0])
    assert 8 <= stopped_at < 400 and latest_tag(run_dir / "ckpt") == tag_of(stopped_at)
    tags = sorted(p.name for p in (run_dir / "ckpt").iterdir() if p.is_dir())
    assert len(tags) == 3 and tags[-1] == tag_of(stopped_at), "keep_last (3) bounds the checkpoints kept"
    resumed = pretrain(
        run_dir,
        manifest,
        "method=mae",
        "deepspeed.config=ds_configs/zero1.json",
        "deepspeed.precision=fp32",
        f"run.max_steps={stopped_at + 2}",
        "run.save_every=2",
    )
    assert resumed.returncode == 0 and f"at step {stopped_at}" in resumed.stderr, resumed.stderr[-3000:]


def test_changed_world_size_or_config_is_refused(stage_run, manifest):
    run_dir = stage_run(1, "mae")
    common = ["method=mae", "deepspeed.config=ds_configs/zero1.json", "run.max_steps=4", *STAGE_EXTRAS[1]]
    single = pretrain(run_dir, manifest, *common, nproc=1)
    assert single.returncode == 2 and "written by 2 processes and this run has 1" in single.stderr
    changed = pretrain(run_dir, manifest, *common, "optim.weight_decay=0.3")
    assert changed.returncode != 0 and "optim.weight_decay: 0.05 -> 0.3" in changed.stderr


def test_deepspeed_launcher_runs_the_same_training(stage_run, manifest, tmp_path):
    """`deepspeed --num_gpus 2 --module pretrain.train` gives the losses torchrun gave."""
    command = pretrain_command(
        tmp_path,
        manifest,
        "method=mae",
        "deepspeed.config=ds_configs/zero0.json",
        "run.max_steps=2",
        "run.save_every=1",
        "run.keep_last=2",
        *STAGE_EXTRAS[0],
    )
    launcher = [
        command[0],
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "2",
        "--module",
        *command[command.index("pretrain.train") :],
    ]
    result = subprocess.run(
        launcher, capture_output=True, text=True, timeout=600, cwd=REPO, env={**os.environ, **TRAIN_ENV}
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert scalar_values(tmp_path, "loss") == scalar_values(stage_run(0, "mae"), "loss")


def test_zero3_with_cpu_offload_trains(manifest, tmp_path):
    result = pretrain(
        tmp_path,
        manifest,
        "method=mae",
        "deepspeed.config=ds_configs/zero3_offload.json",
        "deepspeed.precision=bf16",
        "run.max_steps=2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(math.isfinite(v) for v in scalar_values(tmp_path, "loss"))


def deepspeed_has_fp16():
    """What DeepSpeed's accelerator says in the training processes' environment: its CPU accelerator has fp16
    where oneDNN has fp16 kernels (CPUs with AVX512-FP16 or AMX-FP16), so CI machines differ."""
    probe = "from deepspeed.accelerator import get_accelerator; print(get_accelerator().is_fp16_supported())"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **TRAIN_ENV},
        check=True,
    )
    return result.stdout.split()[-1] == "True"


def test_fp16_trains_where_the_accelerator_has_it_and_is_a_clear_error_elsewhere(manifest, tmp_path):
    result = pretrain(tmp_path, manifest, "deepspeed.precision=fp16", "run.max_steps=2", nproc=1)
    if deepspeed_has_fp16():
        assert result.returncode == 0, result.stderr[-3000:]
        losses = scalar_values(tmp_path, "loss")
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    else:
        assert result.returncode == 2, result.stderr[-3000:]
        assert "deepspeed.precision=fp16 is not supported by DeepSpeed's cpu accelerator" in result.stderr


@pytest.fixture(scope="module")
def hybrid_runs(manifest, tmp_path_factory, zero3_config):
    runs = {}
    for stage, ds_config in ((2, "ds_configs/zero2.json"), (3, zero3_config)):
        run_dir = tmp_path_factory.mktemp(f"hybrid_zero{stage}")
        result = pretrain(
            run_dir,
            manifest,
            "method=hybrid",
            f"deepspeed.config={ds_config}",
            "deepspeed.precision=fp32",
            "run.max_steps=2",
            "run.diagnostics_every=1",
            "run.image_every=2",
            "hybrid.weight=0.5",
        )
        assert result.returncode == 0, result.stderr[-3000:]
        runs[stage] = run_dir
    return runs


def test_hybrid_logs_both_losses_and_the_per_block_gradient_cosine(hybrid_runs):
    events = tensorboard(hybrid_runs[2])
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "loss_mim", "loss_cl", "logit_positive", "momentum"} <= scalars
    cosines = [tag for tag in scalars if tag.startswith("grad_cosine/block_")]
    assert len(cosines) == 12
    assert all(-1 <= e.value <= 1 for tag in cosines for e in events.Scalars(tag))
    assert {"grad_cosine_per_block", "reconstruction"} <= set(events.Tags()["images"])


def test_gradient_cosines_are_the_same_under_zero2_and_zero3(hybrid_runs):
    """ZeRO-3 partitions every parameter; the monitor must still see whole gradients of the global batch."""
    for block in range(12):
        tag = f"grad_cosine/block_{block:02d}"
        zero2, zero3 = scalar_values(hybrid_runs[2], tag), scalar_values(hybrid_runs[3], tag)
        assert zero2 == pytest.approx(zero3, abs=1e-4), tag
    assert scalar_values(hybrid_runs[2], "loss") == pytest.approx(
        scalar_values(hybrid_runs[3], "loss"), rel=1e-5
    )
