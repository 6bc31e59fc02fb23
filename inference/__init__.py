"""Inference: KV-cache decoding and sampling. `inference.generate` is the Python API."""

from inference.engine import generate

__all__ = ["generate"]
