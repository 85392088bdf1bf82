"""Frozen-feature evaluation on known cases."""
import torch

from pretrain.eval import knn_accuracy, linear_probe_accuracy


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
