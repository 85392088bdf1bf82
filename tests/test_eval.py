"""Frozen-feature evaluation: known cases, and lg-eval on real shards."""
import json

import torch

from pretrain.eval import knn_accuracy, linear_probe_accuracy, subset
from pretrain.models import create_encoder
from tests.conftest import run_cli


def test_knn_on_one_hot_label_features_is_perfect():
    labels = torch.arange(50) % 5
    features = torch.nn.functional.one_hot(labels, 5).float()
    assert knn_accuracy(features, labels, features[:20], labels[:20]) == 1.0


def test_knn_follows_the_nearest_neighbours_not_the_majority():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.0, 1.0]])
    assert knn_accuracy(train, labels, queries, torch.tensor([0, 1]), k=5) == 1.0  # weighted votes: 2 near beat 3 far


def test_linear_probe_separates_linearly_separable_features_and_not_noise():
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (400,), generator=generator)
    centers = torch.randn(4, 16, generator=generator) * 3
    features = centers[labels] + torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(features[:300], labels[:300], features[300:], labels[300:]) > 0.97
    noise = torch.randn(400, 16, generator=generator)
    assert linear_probe_accuracy(noise[:300], labels[:300], noise[300:], labels[300:]) < 0.5


def exported_encoder(path):
    """A random ViT-Tiny/8 at 32 px saved as lg-export writes it (state_dict + .json)."""
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", 32, 8)
    torch.save(encoder.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps({"timm": {"model_name": "vit_tiny_patch16_224", "num_classes": 0,
                                                              "img_size": 32, "patch_size": 8}}))
    return path


def test_lg_eval_knn_and_few_shot_linear_on_real_shards(demo_shards, tmp_path):
    encoder = exported_encoder(tmp_path / "encoder.pth")
    shards = ["--train", demo_shards / "train.json", "--val", demo_shards / "val.json"]
    knn = run_cli("pretrain.eval", "knn", encoder, *shards, "--pool", "mean", "--tb", tmp_path / "tb")
    assert knn.returncode == 0, knn.stderr[-2000:]
    result = json.loads((tmp_path / "eval_knn_mean_last.json").read_text())
    assert result["val_samples"] == 359 and result["train_samples"] == 1438 and 20 < result["top1"] <= 100
    assert json.loads(knn.stdout.strip().splitlines()[-1]) == result
    linear = run_cli("pretrain.eval", "linear", encoder, *shards, "--fraction", "0.05", "--layer", "3",
                     "--epochs", "50")
    assert linear.returncode == 0, linear.stderr[-2000:]
    assert json.loads((tmp_path / "eval_linear_token_block_03.json").read_text())["layer"] == "block_03"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_lg_eval_errors_name_the_problem(demo_shards, tmp_path):
    release = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": create_encoder("vit_tiny", 32, 8).state_dict()}, release)
    shards = ["--train", demo_shards / "train.json", "--val", demo_shards / "val.json"]
    no_arch = run_cli("pretrain.eval", "knn", release, *shards)
    assert no_arch.returncode == 2 and f"{release}: give --arch" in no_arch.stderr
    bad_layer = run_cli("pretrain.eval", "knn", release, *shards, "--arch", "vit_tiny", "--img-size", "32",
                        "--patch-size", "8", "--layer", "12")
    assert bad_layer.returncode == 2 and "blocks 0-11" in bad_layer.stderr


def test_subset_keeps_a_fraction_of_every_class():
    labels = torch.arange(1000) % 10
    chosen = subset(labels, 0.01)
    assert len(chosen) == 10 and sorted(labels[chosen].tolist()) == list(range(10))
