"""Measuring encoders: frozen features, kNN, linear probes, fine-tuning results, the per-layer analyses and
the monitors a run calls."""
