"""Experiments: config sweeps (`python -m experiments.sweep`) and reproducibility notebooks."""
