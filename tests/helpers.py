"""Small shared test utilities."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_model_config(**overrides):
    from models.config import ModelConfig

    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, max_seq_len=64, dtype="float32")
    base.update(overrides)
    return ModelConfig(**base)


def random_tokens(rng: np.random.Generator, shape, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, size=shape, dtype=np.int32)


def run_program(module: str, *args: str, env: dict | None = None, timeout: int = 600, check: bool = True):
    """Runs `python -m module args...` from the repo root in a fresh process (1 CPU device)."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
    e["JAX_PLATFORMS"] = "cpu"
    e.update(env or {})
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m {module} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc
