"""Weighted k-nearest-neighbour classification of frozen features (InstDisc / DINO): the one kNN of
lg-eval, the demo's table, the benchmarks and the online monitor."""

import torch
import torch.nn.functional as F

K, TEMPERATURE = 20, 0.07


@torch.no_grad()
def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    val_labels: torch.Tensor,
    k: int = K,
    temperature: float = TEMPERATURE,
) -> float:
    """Top-1 (a fraction) of val: cosine similarity to the train features, the k nearest vote with
    weight exp(similarity / temperature)."""
    train_features, val_features = (
        F.normalize(train_features.float(), dim=1),
        F.normalize(val_features.float(), dim=1),
    )
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    similarity, index = (val_features @ train_features.T).topk(min(k, len(train_features)), dim=1)
    votes = torch.zeros(len(val_features), num_classes)
    votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
    return (votes.argmax(dim=1) == val_labels).float().mean().item()
