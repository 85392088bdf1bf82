"""Evaluation: frozen-feature protocols on known cases, fine-tuning, and lg-eval on real shards."""

import json
import math

import pytest
import timm
import torch
from timm.layers import DropPath
from torchvision.transforms import InterpolationMode

from pretrain.config import load_config
from pretrain.core.errors import UserError
from pretrain.data.views import make_view
from pretrain.eval import knn_accuracy
from pretrain.evaluation.features import linear_probe_accuracy, subset
from pretrain.graft.param_groups import objective_param_groups
from pretrain.graft.start_weights import grafted_objective
from pretrain.methods.finetune import FineTune
from pretrain.models import create_encoder
from tests.conftest import REPO, TRAIN_ENV, run_cli, tensorboard


def test_knn_on_one_hot_label_features_is_perfect():
    labels = torch.arange(50) % 5
    features = torch.nn.functional.one_hot(labels, 5).float()
    assert knn_accuracy(features, labels, features[:20], labels[:20]) == 1.0


def test_knn_follows_the_nearest_neighbours_not_the_majority():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.0, 1.0]])
    # Weighted votes: 2 near beat 3 far.
    assert knn_accuracy(train, labels, queries, torch.tensor([0, 1]), k=5) == 1.0


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
    path.with_suffix(".json").write_text(
        json.dumps(
            {
                "timm": {
                    "model_name": "vit_tiny_patch16_224",
                    "num_classes": 0,
                    "img_size": 32,
                    "patch_size": 8,
                }
            }
        )
    )
    return path


@pytest.mark.slow
def test_lg_eval_knn_and_few_shot_linear_on_real_shards(demo_shards, tmp_path):
    encoder = exported_encoder(tmp_path / "encoder.pth")
    shards = ["--train", demo_shards / "train.json", "--val", demo_shards / "val.json"]
    knn = run_cli("pretrain.eval", "knn", encoder, *shards, "--pool", "mean", "--tb", tmp_path / "tb")
    assert knn.returncode == 0, knn.stderr[-2000:]
    result = json.loads((tmp_path / "eval_knn_mean_last.json").read_text())
    assert result["val_samples"] == 359 and result["train_samples"] == 1438 and 20 < result["top1"] <= 100
    assert json.loads(knn.stdout.strip().splitlines()[-1]) == result
    linear = run_cli(
        "pretrain.eval", "linear", encoder, *shards, "--fraction", "0.05", "--layer", "3", "--epochs", "50"
    )
    assert linear.returncode == 0, linear.stderr[-2000:]
    assert json.loads((tmp_path / "eval_linear_token_block_03.json").read_text())["layer"] == "block_03"
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_lg_eval_errors_name_the_problem(demo_shards, tmp_path):
    release = tmp_path / "mae_pretrain_vit_base.pth"
    torch.save({"model": create_encoder("vit_tiny", 32, 8).state_dict()}, release)
    shards = ["--train", demo_shards / "train.json", "--val", demo_shards / "val.json"]
    no_arch = run_cli("pretrain.eval", "knn", release, *shards)
    assert no_arch.returncode == 2 and f"{release}: give --arch" in no_arch.stderr
    bad_layer = run_cli(
        "pretrain.eval",
        "knn",
        release,
        *shards,
        "--arch",
        "vit_tiny",
        "--img-size",
        "32",
        "--patch-size",
        "8",
        "--layer",
        "12",
    )
    assert bad_layer.returncode == 2 and "blocks 0-11" in bad_layer.stderr
    stray = run_cli("pretrain.eval", "knn", release, *shards, "optim.base_lr=1")
    assert stray.returncode == 2 and "are for finetune and linear --protocol mae|mocov3" in stray.stderr
    cached_fraction = run_cli(
        "pretrain.eval", "linear", release, *shards, "--protocol", "mae", "--fraction", "0.1"
    )
    assert cached_fraction.returncode == 2 and "lg-shard --subset-file" in cached_fraction.stderr


def test_subset_keeps_a_fraction_of_every_class():
    labels = torch.arange(1000) % 10
    chosen = subset(labels, 0.01)
    assert len(chosen) == 10 and sorted(labels[chosen].tolist()) == list(range(10))


def test_finetune_objective_learns_separable_classes_with_label_smoothing():
    torch.manual_seed(0)
    model = FineTune(
        dict(arch="vit_tiny", img_size=16, patch_size=8, num_classes=2, pool="mean", drop_path=0.1)
    )
    images = torch.randn(32, 3, 16, 16) * 0.1
    labels = torch.arange(32) % 2
    images[labels == 1] += 1.0  # class 1 is brighter
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(40):
        optimizer.zero_grad()
        outputs = model(images, labels)
        outputs["loss"].backward()
        optimizer.step()
    model.eval()
    assert model.correct(images, labels) == 32 and outputs["train_top1"] == 1.0
    # Label smoothing 0.1 over 2 classes bounds the loss below by the entropy of (0.95, 0.05).
    assert outputs["loss"] > 0.95 * -math.log(0.95) + 0.05 * -math.log(0.05) - 1e-3


def test_finetune_groups_decay_the_learning_rate_by_depth():
    config = load_config(REPO / "configs" / "finetune_demo.yaml", ["finetune.num_classes=10"])
    objective = grafted_objective(config)
    groups = objective_param_groups(objective, config)
    scale = {layer: g["lr_scale"] for g in groups for layer in g["layer_ids"]}
    depth = len(objective.encoder.blocks)
    assert scale == {layer: 0.75 ** (depth + 1 - layer) for layer in range(depth + 2)}
    head = next(g for g in groups if "encoder.head.weight" in g["names"])
    assert head["lr_scale"] == 1.0 and head["weight_decay"] == 0.05
    position = next(g for g in groups if "encoder.pos_embed" in g["names"])  # trained, as MAE fine-tunes
    assert position["lr_scale"] == 0.75 ** (depth + 1) and position["weight_decay"] == 0
    assert any(isinstance(m, DropPath) for m in objective.encoder.modules())


def test_finetune_augmentation_follows_the_config():
    mild = grafted_objective(
        load_config(REPO / "configs" / "finetune_demo.yaml", ["finetune.num_classes=10"])
    )
    assert [type(t).__name__ for t in make_view(mild.view, 32).transforms] == ["DecodingResizedCrop"]
    full = grafted_objective(
        load_config(
            REPO / "configs" / "finetune_demo.yaml",
            [
                "finetune.num_classes=10",
                "finetune.flip=true",
                "finetune.rand_augment=rand-m9-mstd0.5-inc1",
                "finetune.min_scale=0.08",
            ],
        )
    )
    transforms = make_view(full.view, 32).transforms
    assert [type(t).__name__ for t in transforms] == [
        "DecodingResizedCrop",
        "RandomHorizontalFlip",
        "TimmRandAugment",
    ]
    assert transforms[0].scale == (0.08, 1.0) and transforms[0].interpolation == InterpolationMode.BICUBIC
    with pytest.raises(UserError, match="finetune.pool"):
        load_config(None, ["finetune.pool=max"])


@pytest.mark.dist
def test_lg_eval_finetune_under_zero3_on_two_processes(demo_shards, tmp_path, zero3_config):
    """Real DeepSpeed ZeRO-3 (every parameter partitioned), 2 processes: a few steps from an exported
    encoder, then the val split measured by both ranks, a classifier file, JSON and TensorBoard, all in
    the run.dir the overrides name."""
    encoder = exported_encoder(tmp_path / "encoder.pth")
    result = run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "pretrain.eval",
        "finetune",
        encoder,
        "--train",
        demo_shards / "train.json",
        "--val",
        demo_shards / "val.json",
        "--config",
        REPO / "configs" / "finetune_demo.yaml",
        "run.max_steps=3",
        "run.log_every=1",
        "deepspeed.micro_batch_size=16",
        f"deepspeed.config={zero3_config}",
        "--out",
        tmp_path / "result.json",
        f"run.dir={tmp_path / 'ft'}",
        env=TRAIN_ENV,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "ft"  # a run.dir override is where the run and its result go
    reported = json.loads((run_dir / "eval_finetune.json").read_text())
    assert reported == json.loads((tmp_path / "result.json").read_text())
    assert reported["val_samples"] == 359 and reported["steps"] == 3 and 0 <= reported["top1"] <= 100
    assert result.stdout.count('"protocol": "finetune"') == 1  # printed by rank 0 only
    config = load_config(run_dir / "config.yaml")
    assert (config.model.patch_size, config.method, config.graft.init) == (8, "finetune", str(encoder))
    timm_call = json.loads((run_dir / "classifier.json").read_text())["timm"]
    assert timm_call == {
        "model_name": "vit_tiny_patch16_224",
        "num_classes": 10,
        "global_pool": "avg",
        "img_size": 32,
        "patch_size": 8,
    }
    classifier = timm.create_model(**timm_call)  # a timm model, as MAE's global-pool fine-tuned one
    classifier.load_state_dict(torch.load(run_dir / "classifier.pth", weights_only=True), strict=True)
    events = tensorboard(run_dir)
    assert [e.value for e in events.Scalars("eval/finetune_top1")] == [pytest.approx(reported["top1"])]
    assert len(events.Scalars("train_top1")) == 3
    first, head = events.Scalars("lr/layers_0")[-1].value, events.Scalars("lr/layers_13")[-1].value
    assert math.isclose(first / head, 0.75**13, rel_tol=1e-4)
