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


@pytest.mark.parametrize("module", ["data_prep.shard", "data_prep.verify", "data_prep.demo_data", "pretrain.demo"])
def test_every_command_has_help(module):
    result = run_cli(module, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_console_scripts_are_declared():
    setup = (REPO / "setup.cfg").read_text()
    for script in ("lg-shard = data_prep.shard:main", "lg-verify = data_prep.verify:main",
                   "lg-demo-data = data_prep.demo_data:main", "lg-demo = pretrain.demo:main"):
        assert script in setup


@pytest.mark.dist
def test_demo_runs_end_to_end_and_again(tmp_path):
    """data set -> shards -> loaders -> MAE, MoCo v3 and grafted MoCo v3 on 2 processes -> export ->
    kNN / linear table -> analysis plots -> TensorBoard; then again, resuming and reusing."""
    demo = tmp_path / "demo"
    first = run_cli("pretrain.demo", "--workdir", demo, timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    assert "train resampled view=mae  22 batches, 1408 samples" in first.stdout
    assert "val   epoch     view=eval 7 batches, 359 samples" in first.stdout
    run_dir, moco_dir, graft_dir = demo / "mae", demo / "mocov3", demo / "graft"
    assert f"TensorBoard: tensorboard --logdir {demo}" in first.stdout
    losses = scalar_values(run_dir, "loss")
    assert len(losses) == 22 and losses[-1] < 0.7 * losses[0], losses
    assert f"encoder initialized from {run_dir}" in first.stdout and first.stdout.count("encoder initialized") == 1
    lr_tags = lambda d: {tag for tag in tensorboard(d).Tags()["scalars"] if tag.startswith("lr/layers_")}
    assert lr_tags(graft_dir) == {"lr/layers_0-8", "lr/layers_9-13"} and lr_tags(moco_dir) == {"lr/layers_0-13"}
    for directory in (run_dir, moco_dir, graft_dir):
        encoder = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4)
        encoder.load_state_dict(torch.load(directory / "encoder.pth"), strict=True)
        assert len(scalar_values(directory, "eval/knn_top1")) == 1
    results = json.loads((demo / "eval.json").read_text())
    assert list(results) == ["random init", "MAE", "MoCo v3", "MIM->CL"]
    assert all(0 <= r[key] <= 100 for r in results.values() for key in ("knn_top1", "linear_top1"))
    assert f"{'MAE':<12}{results['MAE']['knn_top1']:>10.1f}%" in first.stdout  # the printed table
    analysis = json.loads((demo / "analysis" / "results.json").read_text())
    assert list(analysis) == ["MAE", "MoCo v3", "MIM->CL"] and len(analysis["MAE"]["linear_probe"]) == 12
    plots = {path.name for path in (demo / "analysis").glob("*.png")}
    assert {"attention_distance_px.png", "attention_nmi.png", "cka_layers.png", "cka_models.png",
            "linear_probe.png"} <= plots
    assert all(name in first.stdout for name in plots)
    stamp = (demo / "eval.json").stat().st_mtime
    second = run_cli("pretrain.demo", "--workdir", demo, timeout=900)
    assert second.returncode == 0 and "already complete" in second.stdout
    assert "resumed" in second.stdout and "step 220/220" not in second.stdout
    assert (demo / "eval.json").stat().st_mtime == stamp and "random init" in second.stdout
