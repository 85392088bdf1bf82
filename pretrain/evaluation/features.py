"""Frozen features of a split, and the kNN and linear probes on them."""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from pretrain.config import load_config
from pretrain.core.errors import UserError
from pretrain.core.weights import load_encoder_weights, read_state_dict
from pretrain.data.loader import make_loader
from pretrain.data.views import normalize
from pretrain.evaluation.knn import knn_accuracy
from pretrain.evaluation.measures import block_tokens
from pretrain.models import TIMM_NAMES, create_encoder, pool_tokens


def encoder_from(source: str | Path, arch: str, img_size: int, patch_size: int) -> nn.Module:
    """The encoder of `source` in eval mode. A global-pool classifier (MAE's fine-tuned release files and
    our classifier.pth: `fc_norm` and no `norm`) keeps that layout: its "mean" features pass `fc_norm`."""
    encoder = create_encoder(arch, img_size, patch_size)
    state = read_state_dict(source, what="encoder")
    if "fc_norm.weight" in state and "norm.weight" not in state:
        encoder.norm, encoder.fc_norm = nn.Identity(), nn.LayerNorm(encoder.embed_dim, eps=1e-6)
    load_encoder_weights(encoder, source, state=state, what="encoder")
    return encoder.eval()


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    manifest: str | Path,
    img_size: int,
    pools: Sequence[str] = ("token",),
    layers: Sequence[int] = (-1,),
    batch_size: int = 256,
    num_workers: int = 1,
    progress: bool = False,
) -> tuple[dict[tuple[str, int], torch.Tensor], torch.Tensor]:
    """({(pool, layer): (N, D) features}, labels) of every image of a split, in shard order, in one pass.

    pool "token": the class token, "mean": the mean patch token; layer -1: the normalized output of the
    last block, i >= 0: the output of block i (before the final norm).
    """
    loader = make_loader(
        manifest,
        batch_size,
        view="eval",
        img_size=img_size,
        mode="epoch",
        num_workers=num_workers,
        rank=0,
        world_size=1,
    )
    features, labels = {(pool, layer): [] for pool in pools for layer in layers}, []
    batches = tqdm(
        loader.epoch(0), total=loader.num_batches(0), desc="features", unit="batch", disable=not progress
    )
    for batch in batches:
        with block_tokens(encoder) as per_block:
            last = encoder.forward_features(normalize(batch["images"]))
        kept = ~batch["replaced"]  # a sample that did not decode is left out, not scored as another's copy
        for (pool, layer), store in features.items():
            store.append(pool_tokens(encoder, last if layer < 0 else per_block[layer], pool).float()[kept])
        labels.append(batch["labels"][kept])
    return {key: torch.cat(store) for key, store in features.items()}, torch.cat(labels)


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    epochs: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(
        nn.BatchNorm1d(train_features.shape[1], affine=False), nn.Linear(train_features.shape[1], num_classes)
    )
    with torch.no_grad():
        head[1].weight.normal_(0, 0.01, generator=generator)
        head[1].bias.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(head(train_features), train_labels).backward()
        optimizer.step()
    head.eval()
    with torch.no_grad():
        return (head(val_features).argmax(dim=1) == val_labels).float().mean().item()


def subset(labels, fraction, seed=0):
    """Indices of `fraction` of the samples of every class (at least one each), chosen by `seed`."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in labels.unique():
        members = (labels == label).nonzero().flatten()
        keep = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=generator)[:keep]])
    return torch.cat(chosen)


def few_shot(labels, shots):
    """Indices of the first `shots` samples of every class, in split order (the few-shot probe's labels:
    10 per class is the papers' 1 % setting at the demo's scale)."""
    return torch.cat([(labels == c).nonzero().flatten()[:shots] for c in labels.unique()])


def frozen_scores(
    encoder: nn.Module,
    train_manifest: str | Path,
    val_manifest: str | Path,
    img_size: int,
    pools: Sequence[str] = ("token",),
    shots: int = 10,
) -> dict[str, float]:
    """Frozen-feature top-1 (%) on val of the last block's features, per pool: kNN (`knn_<pool>`), the
    linear probe with every label (`linear_<pool>`) and with `shots` per class
    (`linear<shots>shot_<pool>`)."""
    (train, train_y), (val, val_y) = (
        extract_features(encoder, manifest, img_size, pools) for manifest in (train_manifest, val_manifest)
    )
    few, scores = few_shot(train_y, shots), {}
    for pool in pools:
        train_f, val_f = train[pool, -1], val[pool, -1]
        scores[f"knn_{pool}"] = 100 * knn_accuracy(train_f, train_y, val_f, val_y)
        scores[f"linear_{pool}"] = 100 * linear_probe_accuracy(train_f, train_y, val_f, val_y)
        scores[f"linear{shots}shot_{pool}"] = 100 * linear_probe_accuracy(
            train_f[few], train_y[few], val_f, val_y
        )
    return scores


def architecture(source, args):
    """(arch, img_size, patch_size) of an encoder source: its run config, its lg-export .json, or flags."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        config = load_config(source / "config.yaml")
        return config.model.arch, config.data.img_size, config.model.patch
    info = source.with_suffix(".json")
    if source.is_file() and info.is_file():
        timm_kwargs = json.loads(info.read_text())["timm"]
        arch = {name: arch for arch, name in TIMM_NAMES.items()}[timm_kwargs["model_name"]]
        return arch, timm_kwargs["img_size"], timm_kwargs["patch_size"]
    if args.arch is None:
        raise UserError(
            f"{source}: give --arch (and --img-size, --patch-size): no run config or lg-export .json "
            "says what architecture it is"
        )
    return args.arch, args.img_size, args.patch_size or (14 if args.arch == "vit_huge" else 16)
