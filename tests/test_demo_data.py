"""The embedded data set and the commands around it."""

import json

import pytest
import timm
import torch
from PIL import Image

from tests.conftest import REPO, run_cli, scalar_values, tensorboard, write_file


def test_demo_data_is_a_32px_rgb_imagefolder_of_all_digits(demo_images):
    files = {split: sorted((demo_images / split).rglob("*.jpg")) for split in ("train", "val")}
    assert (len(files["train"]), len(files["val"])) == (1438, 359)
    assert sorted(p.name for p in (demo_images / "val").iterdir()) == [str(d) for d in range(10)]
    assert not {p.name for p in files["train"]} & {p.name for p in files["val"]}
    with Image.open(files["val"][0]) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))


def test_demo_data_command_is_idempotent_and_refuses_foreign_folders(demo_images, tmp_path):
    again = run_cli("data_prep.demo_data", demo_images)
    assert again.returncode == 0 and "already holds" in again.stdout
    write_file(tmp_path / "busy" / "thesis.tex", b"\\documentclass{article}")
    refused = run_cli("data_prep.demo_data", tmp_path / "busy")
    assert refused.returncode == 2 and "is not the demo data set" in refused.stderr


@pytest.mark.parametrize(
    "module", ["data_prep.shard", "data_prep.verify", "data_prep.demo_data", "pretrain.demo"]
)
def test_every_command_has_help(module):
    result = run_cli(module, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_console_scripts_are_declared():
    setup = (REPO / "setup.cfg").read_text()
    for script in (
        "lg-shard = data_prep.shard:main",
        "lg-verify = data_prep.verify:main",
        "lg-demo-data = data_prep.demo_data:main",
        "lg-demo = pretrain.demo:main",
    ):
        assert script in setup


def total_steps(run_dir):
    from pretrain.config import load_config

    config = load_config(run_dir / "config.yaml")
    return round(config.optim.epochs * (1438 // (2 * config.deepspeed.micro_batch_size))), config


@pytest.mark.dist
def test_demo_runs_end_to_end(demo_run):
    """data set -> shards -> loaders -> MAE, MoCo v3 and grafted MoCo v3 on 2 processes, with the kNN
    monitor -> export -> kNN / linear / 10-shot table -> kNN curves -> analysis plots -> TensorBoard."""
    demo, first = demo_run
    assert "train resampled view=mae  22 batches, 1408 samples" in first.stdout
    assert "val   epoch     view=eval 7 batches, 359 samples" in first.stdout
    run_dir, moco_dir, graft_dir = demo / "mae", demo / "mocov3", demo / "graft"
    assert f"TensorBoard: tensorboard --logdir {demo}" in first.stdout
    assert (
        f"encoder initialized from {run_dir}" in first.stdout
        and first.stdout.count("encoder initialized") == 1
    )
    lr_tags = lambda d: {tag for tag in tensorboard(d).Tags()["scalars"] if tag.startswith("lr/layers_")}
    assert lr_tags(graft_dir) == {"lr/layers_0-8", "lr/layers_9-13"} and lr_tags(moco_dir) == {
        "lr/layers_0-13"
    }
    for directory in (run_dir, moco_dir, graft_dir):
        steps, config = total_steps(directory)
        encoder = timm.create_model(
            "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=config.model.patch
        )
        encoder.load_state_dict(torch.load(directory / "encoder.pth"), strict=True)
        knn = tensorboard(directory).Scalars("eval/knn_top1")  # the online monitor, from step 0 on
        assert [e.step for e in knn] == sorted({*range(0, steps + 1, 20), steps}) and all(
            0 <= e.value <= 100 for e in knn
        )
        assert len(scalar_values(directory, "eval/final_linear10shot_top1")) == 1
    results = json.loads((demo / "eval.json").read_text())
    assert list(results) == ["random init", "MAE", "MoCo v3", "MIM->CL"]
    keys = ("knn_top1", "linear_top1", "linear10shot_top1")
    assert all(0 <= r[key] <= 100 for r in results.values() for key in keys)
    assert f"{'MAE':<12}{results['MAE']['knn_top1']:>15.1f}%" in first.stdout  # the printed table
    # One protocol: the monitor's last point is the table's kNN of the exported weights (exactly for the fp32
    # MAE run; the bf16 runs' monitor reads the bf16 copies of the weights the export holds in fp32).
    assert results["MAE"]["knn_top1"] == pytest.approx(scalar_values(run_dir, "eval/knn_top1")[-1], abs=0.01)
    assert (
        demo / "knn_curves.png"
    ).stat().st_size > 5000 and f"kNN curves: {demo / 'knn_curves.png'}" in first.stdout
    analysis = json.loads((demo / "analysis" / "results.json").read_text())
    assert list(analysis) == ["MAE", "MoCo v3", "MIM->CL"] and len(analysis["MAE"]["linear_probe"]) == 12
    plots = {path.name for path in (demo / "analysis").glob("*.png")}
    assert {
        "attention_distance_px.png",
        "attention_nmi.png",
        "cka_layers.png",
        "cka_models.png",
        "linear_probe.png",
    } <= plots
    assert all(name in first.stdout for name in plots)


@pytest.mark.dist
def test_demo_trainings_learn_and_log_what_the_readme_says(demo_run):
    demo, _ = demo_run
    mae, moco = demo / "mae", demo / "mocov3"
    losses = scalar_values(mae, "loss")
    steps, config = total_steps(mae)
    assert len(losses) == steps // config.run.log_every and losses[-1] < 0.7 * losses[0], losses
    moco_losses = scalar_values(moco, "loss")
    assert min(moco_losses[-3:]) < 0.98 * moco_losses[0], moco_losses
    common = {
        "loss",
        "lr/first_group",
        "lr/last_group",
        "grad_norm",
        "perf/images_per_s",
        "perf/step_time_s",
        "data/samples_seen",
        "data/bad_samples",
        "memory/bytes",
        "eval/knn_top1",
    }
    mae_events, moco_events = tensorboard(mae), tensorboard(moco)
    assert common <= set(mae_events.Tags()["scalars"])
    assert common | {
        "logit_positive",
        "logit_negative",
        "momentum",
        "repr/pair_top1",
        "repr/alignment",
        "repr/uniformity",
        "repr/std",
    } <= set(moco_events.Tags()["scalars"])
    images = mae_events.Images("reconstruction")
    assert [image.step for image in images] == list(range(50, steps + 1, 50)) and images[0].width > 32
    text = mae_events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "method: mae" in text and "vit_tiny" in text
    momentum = [event.value for event in moco_events.Scalars("momentum")]
    assert (
        momentum == sorted(momentum) and load_config_of(moco).moco.momentum <= momentum[0] < momentum[-1] < 1
    )
    assert scalar_values(mae, "data/samples_seen")[-1] == steps * 64
    log = (mae / "train.log").read_text()
    assert f"step {steps}/{steps}" in log and "img/s" in log and "eta" in log


def load_config_of(run_dir):
    return total_steps(run_dir)[1]


@pytest.mark.dist
def test_demo_runs_again_resuming_and_reusing(demo_run):
    demo, _ = demo_run
    stamp = (demo / "eval.json").stat().st_mtime
    second = run_cli("pretrain.demo", "--workdir", demo, timeout=900)
    assert second.returncode == 0 and "already complete" in second.stdout
    assert "resumed" in second.stdout and "kNN top-1" not in second.stdout.split("== 5.")[1].split("== 8.")[0]
    assert (demo / "eval.json").stat().st_mtime == stamp and "random init" in second.stdout
