"""The online kNN monitor's pieces in one process (its kNN is tested in test_eval.py, the monitor inside real
2-process trainings in test_train_dist.py)."""

import pytest
import timm
import torch

from pretrain.config import load_config
from pretrain.core.errors import UserError
from pretrain.data.views import normalize
from pretrain.evaluation.knn import knn_accuracy
from pretrain.evaluation.knn_monitor import KNNMonitor, gather_rows, load_share
from pretrain.evaluation.live_copy import LiveCopy
from pretrain.models import create_encoder


def test_a_share_takes_its_ranks_shards_and_caps_each_class(demo_shards):
    val = demo_shards / "val.json"
    images, labels, bad = load_share(val, 32)
    assert images.shape == (359, 3, 32, 32) and images.dtype == torch.uint8 and bad == 0
    halves = [load_share(val, 32, rank_=r, world=2) for r in (0, 1)]
    assert sum(len(h[1]) for h in halves) == 359 and all(len(h[1]) > 0 for h in halves)
    capped = [load_share(val, 32, per_class=5, rank_=r, world=2)[1] for r in (0, 1)]
    assert all(torch.bincount(c, minlength=10).max() <= 3 for c in capped)  # ceil(5 / 2) per rank
    assert torch.bincount(torch.cat(capped), minlength=10).min() >= 3


def test_gather_rows_is_the_identity_in_one_process():
    rows = torch.randn(3, 4)
    assert gather_rows(rows) is rows


def test_monitor_measures_a_copy_and_refuses_missing_manifests(demo_shards, tmp_path):
    val = demo_shards / "val.json"
    config = load_config(
        None,
        [
            "model.arch=vit_tiny",
            "model.patch_size=8",
            "data.img_size=32",
            "run.knn_every=5",
            f"data.knn_train={val}",
            f"data.knn_val={val}",
            "data.knn_per_class=8",
        ],
    )
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny", 32, 8).train()
    state = torch.random.get_rng_state()
    monitor = KNNMonitor(config, encoder, torch.device("cpu"), 64)
    assert torch.equal(state, torch.random.get_rng_state()), "the monitor leaves the generator alone"
    top1 = monitor.measure()
    images, labels, _ = load_share(demo_shards / "val.json", 32, per_class=8)
    with torch.no_grad():
        features = encoder.eval().forward_features(normalize(images))[:, 0]
    encoder.train()
    assert top1 == pytest.approx(100 * knn_accuracy(features, labels, features, labels), abs=1e-9)
    assert encoder.training and monitor.sizes == [80, 80, 0]
    with torch.no_grad():
        encoder.blocks[0].attn.qkv.weight.add_(1.0)
    monitor.measure()
    assert torch.equal(monitor.copy.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight), (
        "fresh weights"
    )
    missing = load_config(
        None,
        [
            "run.knn_every=5",
            f"data.knn_train={tmp_path / 'nope.json'}",
            f"data.knn_val={demo_shards / 'val.json'}",
        ],
    )
    with pytest.raises(UserError, match="config key data.knn_train: manifest .*nope.json does not exist"):
        KNNMonitor(missing, encoder, torch.device("cpu"), 64)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["run.knn_every=10"], "run.knn_every = 10 must be 0 unless data.knn_train and data.knn_val"),
        (["run.knn_pool=max"], "run.knn_pool = 'max' must be token or mean"),
        (["data.knn_per_class=-1"], "run.knn_every = 0 must be >= 0 \\(data.knn_per_class too\\)"),
    ],
)
def test_bad_monitor_settings_are_named_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_a_live_copy_takes_the_copys_entries_in_float32_and_leaves_the_generator_alone():
    torch.manual_seed(0)
    classifier = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, global_pool="token"
    ).to(torch.bfloat16)
    state = torch.random.get_rng_state()
    copy = LiveCopy(lambda: create_encoder("vit_tiny", 32, 8), torch.device("cpu"))
    assert torch.equal(state, torch.random.get_rng_state())
    module = copy.refresh(classifier)  # the classifier's head is not the copy's: left out
    assert module is copy.module and not module.training and "head.weight" not in module.state_dict()
    for name, value in module.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, classifier.state_dict()[name].float()), (
            name
        )
    with pytest.raises(KeyError, match="cls_token"):
        copy.refresh(torch.nn.Linear(2, 2))
