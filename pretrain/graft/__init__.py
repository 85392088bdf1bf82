"""Layer-grafted pretraining: layer-wise learning-rate rules, starting weights, the L1 pull and the
automatic split."""
