"""Turn image collections (ImageNet, any ImageFolder) into WebDataset shards with a manifest."""
