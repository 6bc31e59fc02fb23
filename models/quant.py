"""Weight-only quantization: int8 per output channel, int4 in groups along the contraction.

  int8  q = round(w / s), s = max|w| / 127 over the contracted dimensions (one scale per output
        channel); 1 byte per weight.
  int4  the last contracted dimension is cut into groups of `group_size`; q = round(w / s) in
        [-7, 7], s = max|w| / 7 per group; two values packed per byte (low nibble first).
Weights are dequantized to the compute dtype where they are used (inside the layer scan, so only
one layer's weights exist in floating point at a time); activations stay in the compute dtype.
`quantize_model(model, "int8")` converts every projection and the embedding table of a Decoder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.projection import Embedding, Kernel, contract_axes, map_kernels, mixed_einsum

MODES = ("int8", "int4")
_QMAX = {"int8": 127, "int4": 7}


def quantize_array(w, contract_axes: tuple[int, ...], mode: str, group_size: int = 64):
    """(q, scale, meta) for a float array; `meta` = (mode, group axis, group size) for dequantize."""
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r} is not valid; expected one of {MODES}")
    w = jnp.asarray(w, jnp.float32)
    if mode == "int8":
        s = jnp.max(jnp.abs(w), axis=contract_axes, keepdims=True) / 127.0
        s = jnp.where(s == 0, 1.0, s)
        q = jnp.clip(jnp.round(w / s), -127, 127).astype(jnp.int8)
        return q, s, ("int8", -1, 0)
    axis = contract_axes[-1] % w.ndim
    n = w.shape[axis]
    g = min(group_size, n)
    if n % g or g % 2:
        raise ValueError(f"int4 groups of {g} do not divide dimension {n} (axis {axis} of shape {w.shape}) "
                         "into an even group size; choose another group_size")
    shape = w.shape[:axis] + (n // g, g) + w.shape[axis + 1:]
    wg = w.reshape(shape)
    s = jnp.max(jnp.abs(wg), axis=axis + 1, keepdims=True) / 7.0
    s = jnp.where(s == 0, 1.0, s)
    q = jnp.clip(jnp.round(wg / s), -7, 7).astype(jnp.int8)
    nib = (q & 0xF).astype(jnp.uint8)
    lo, hi = jnp.split(nib, 2, axis=axis + 1)  # first half / second half of each group
    packed = (lo | (hi << 4)).astype(jnp.uint8)
    # the group-count axis, counted from the end of the packed array: valid for any leading axes
    return packed, s, ("int4", axis - (w.ndim + 1), g)


def dequantize(q, scale, meta, dtype):
    """The float array (in `dtype`) that `quantize_array` encoded (a slice of it along leading
    axes, e.g. one layer of a stacked kernel, dequantizes the same way)."""
    mode, axis, _ = meta
    if mode == "int8":
        return (q.astype(jnp.float32) * scale).astype(dtype)
    ax = q.ndim + axis
    lo = (q & 0xF).astype(jnp.int8)
    hi = (q >> 4).astype(jnp.int8)
    lo = jnp.where(lo > 7, lo - 16, lo)
    hi = jnp.where(hi > 7, hi - 16, hi)
    grouped = jnp.concatenate([lo, hi], axis=ax + 1).astype(jnp.float32) * scale
    shape = grouped.shape[:ax] + (grouped.shape[ax] * grouped.shape[ax + 1],) + grouped.shape[ax + 2:]
    return grouped.reshape(shape).astype(dtype)


class QuantKernel(nnx.Module):
    """A weight stored as int8 / packed int4 `values` with float32 `scale`s (a kernel in the sense
    of models/projection.py): dequantized to the compute dtype where it is used, inside the layer
    scan, so only one layer's weights exist in floating point at a time."""

    def __init__(self, values, scale, meta, axes):
        self.values = nnx.Param(values, axes=axes)
        self.scale = nnx.Param(scale, axes=(None,) * scale.ndim)
        self.meta = meta  # (mode, group axis from the end, group size): static

    def dense(self, dtype):
        return dequantize(self.values[...], self.scale[...], self.meta, dtype)

    def einsum(self, spec: str, x, dtype, out_dtype):
        return mixed_einsum(spec, x, self.dense(dtype), dtype, out_dtype)


class QuantEmbedding(QuantKernel):
    """The token table, quantized per row (along D): rows dequantize only what they look up."""

    def rows(self, ids, dtype):
        return dequantize(jnp.take(self.values[...], ids, axis=0), jnp.take(self.scale[...], ids, axis=0),
                          self.meta, dtype)


def quantize_model(model, mode: str, *, group_size: int = 64):
    """A copy of a Decoder with int8 / int4 projections and embedding table (weight-only)."""
    from models.transformer import Decoder

    if not isinstance(model, Decoder):
        raise TypeError(f"quantize_model takes a models.transformer.Decoder, not {type(model).__name__}")
    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r} is not valid; expected one of {MODES}")
    model = nnx.clone(model)

    def quantize(path, proj, kernel):
        if type(kernel) is not Kernel:  # already quantized, or another variant: left alone
            return kernel
        lead = kernel[...].ndim - len(proj.spec.split("->")[0].split(",")[1])  # stacked-layer axes
        axes = tuple(a + lead for a in contract_axes(proj.spec))
        q, s, meta = quantize_array(kernel[...], axes, mode, group_size)
        return QuantKernel(q, s, meta, kernel.get_metadata().get("axes"))

    map_kernels(model, quantize)
    if type(model.embed) is Embedding:
        q, s, meta = quantize_array(model.embed[...], (1,), mode, group_size)
        model.embed = QuantEmbedding(q, s, meta, model.embed.get_metadata().get("axes"))
    return model


def param_bytes(model) -> int:
    """Bytes of every parameter array (what a quantized model saves)."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(nnx.state(model))))
