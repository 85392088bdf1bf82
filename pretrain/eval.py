"""Frozen-feature evaluation: weighted kNN and a linear probe on features of the sharded splits.

* `encoder_from(source, arch, img_size, patch)`: a timm encoder with the weights of a run directory,
  an lg-export file or an official release file (read as grafting reads them).
* `extract_features`: one pass over a split in epoch mode (every image once, eval view), the encoder's
  class token (`pool="token"`) or mean patch token (`pool="mean"`).
* `knn_accuracy`: weighted kNN as in InstDisc / DINO: cosine similarity, k = 20 neighbours voting with
  exp(sim / 0.07).
* `linear_probe_accuracy`: MAE's linear probe on frozen features: BatchNorm without affine parameters,
  then a linear layer; trained full-batch with AdamW here (features fit in memory at toy scale).
"""
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.data import make_loader
from pretrain.grafting import load_start_weights
from pretrain.models import create_encoder
from pretrain.views import normalize


def encoder_from(source, arch, img_size, patch_size):
    encoder = create_encoder(arch, img_size, patch_size)
    load_start_weights(encoder, source)
    return encoder.eval()


@torch.no_grad()
def extract_features(encoder, manifest, img_size, pool="token", batch_size=256, num_workers=1):
    """(features, labels) of every image of a split, in shard order."""
    loader = make_loader(manifest, batch_size, view="eval", img_size=img_size, mode="epoch",
                         num_workers=num_workers, rank=0, world_size=1)
    features, labels = [], []
    for batch in loader.epoch(0):
        tokens = encoder.forward_features(normalize(batch["images"]))
        pooled = tokens[:, 0] if pool == "token" else tokens[:, encoder.num_prefix_tokens:].mean(dim=1)
        features.append(pooled.float())
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_features, train_labels, val_features, val_labels, k=20, temperature=0.07):
    train_features, val_features = F.normalize(train_features, dim=1), F.normalize(val_features, dim=1)
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    similarity, index = (val_features @ train_features.T).topk(k, dim=1)
    votes = torch.zeros(len(val_features), num_classes)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return (votes.argmax(dim=1) == val_labels).float().mean().item()


def linear_probe_accuracy(train_features, train_labels, val_features, val_labels, epochs=300, lr=1e-2,
                          weight_decay=0.0, seed=0):
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    head = nn.Sequential(nn.BatchNorm1d(train_features.shape[1], affine=False),
                         nn.Linear(train_features.shape[1], num_classes))
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
