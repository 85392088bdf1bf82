"""The embedded data set and the commands around it."""
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
    """data set -> shards -> loaders -> MAE on 2 processes -> export -> TensorBoard; then again, resuming."""
    first = run_cli("pretrain.demo", "--workdir", tmp_path / "demo", timeout=900)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    assert "train resampled view=mae  22 batches, 1408 samples" in first.stdout
    assert "val   epoch     view=eval 7 batches, 359 samples" in first.stdout
    run_dir, graft_dir = tmp_path / "demo" / "mae", tmp_path / "demo" / "graft"
    assert f"TensorBoard: tensorboard --logdir {tmp_path / 'demo'}" in first.stdout
    losses = scalar_values(run_dir, "loss")
    assert len(losses) == 22 and losses[-1] < 0.7 * losses[0], losses
    assert f"encoder initialized from {run_dir}" in first.stdout
    graft_lrs = {tag for tag in tensorboard(graft_dir).Tags()["scalars"] if tag.startswith("lr/layers_")}
    assert graft_lrs == {"lr/layers_0-8", "lr/layers_9-13"}
    for directory in (run_dir, graft_dir):
        encoder = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=4)
        encoder.load_state_dict(torch.load(directory / "encoder.pth"), strict=True)
    second = run_cli("pretrain.demo", "--workdir", tmp_path / "demo", timeout=900)
    assert second.returncode == 0 and "already complete" in second.stdout
    assert "resumed" in second.stdout and "step 220/220" not in second.stdout
