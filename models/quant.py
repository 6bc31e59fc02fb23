"""Weight-only quantization: int8 per output channel, int4 in groups along the contraction.

  int8  q = round(w / s), s = max|w| / 127 over the contracted dimensions (one scale per output
        channel); 1 byte per weight.
  int4  the last contracted dimension is cut into groups of `group_size`; q = round(w / s) in
        [-7, 7], s = max|w| / 7 per group; two values packed per byte (low nibble first).
Weights are dequantized to the compute dtype where they are used (inside the layer scan, so only
one layer's weights exist in floating point at a time); activations stay in the compute dtype.
`quantize_model(model, "int8")` converts every projection and the embedding table of a Decoder.

  nf4   QLoRA's frozen base (Dettmers et al., 2023): each block of `block_size` weights along the
        contraction (input) axis is scaled by its absmax and rounded to the nearest of 16
        NormalFloat levels (bitsandbytes' codebook); two codes per byte. With double quantization
        the f32 absmaxes, less their mean, are stored as int8 in blocks of 256 with an f32 scale
        each (about 4.13 bits per weight instead of 4.5). `quantize_base(model)` converts the
        stacked layers' projections and leaves the embedding and the output head in floating point,
        as QLoRA does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.projection import Embedding, Kernel, contract_axes, map_kernels, mixed_einsum

MODES = ("int8", "int4")
# bitsandbytes' NF4 levels (quantiles of N(0, 1) scaled to [-1, 1], with an exact 0)
NF4_LEVELS = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                       0.7229568362236023, 1.0], np.float32)
DQ_BLOCK = 256  # absmaxes per second-level block under double quantization
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

    def einsum(self, spec: str, x, dtype, out_dtype, rng=None):
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



def nf4_quantize(w, n_lead: int, n_contract: int, *, block_size: int = 64, double_quant: bool = False) -> dict:
    """The arrays of an `NF4Kernel` for a weight [lead..., in..., out...] (`n_lead` stacked-layer
    axes first, then `n_contract` contracted ones): codes [lead..., N, K/bs, bs/2] (uint8, two per
    byte, low nibble first), and the per-block absmax [lead..., N, K/bs] as float32 or, with
    double quantization, as int8 codes with float32 scales per 256 and a float32 mean per layer.
    Blocks run along K = the flattened input features, for each output feature n."""
    w = jnp.asarray(w, jnp.float32)
    lead, k_shape = w.shape[:n_lead], w.shape[n_lead:n_lead + n_contract]
    k = int(np.prod(k_shape))
    bs = min(int(block_size), k)
    if bs < 2 or k % bs or bs % 2:
        raise ValueError(f"NF4 blocks of {bs} do not divide the {k} input features of a weight of shape "
                         f"{tuple(w.shape)} into an even block size; choose another block_size")
    w_NK = jnp.swapaxes(w.reshape(lead + (k, -1)), -1, -2)  # [lead..., N, K]
    blocks = w_NK.reshape(w_NK.shape[:-1] + (k // bs, bs))
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    absmax = jnp.where(absmax == 0, 1.0, absmax)
    scaled = blocks / absmax[..., None]
    codes = jnp.argmin(jnp.abs(scaled[..., None] - jnp.asarray(NF4_LEVELS)), axis=-1).astype(jnp.uint8)
    lo, hi = codes[..., 0::2], codes[..., 1::2]
    out = {"codes": (lo | (hi << 4)).astype(jnp.uint8)}
    if not double_quant:
        out["absmax"] = absmax
        return out
    flat = absmax.reshape(lead + (-1,))
    m = flat.shape[-1]
    dq = DQ_BLOCK if m % DQ_BLOCK == 0 else m  # a layer with fewer (or an odd count of) blocks: one group
    mean = flat.mean(-1, keepdims=True)
    centred = (flat - mean).reshape(lead + (m // dq, dq))
    scale2 = jnp.max(jnp.abs(centred), axis=-1, keepdims=True) / 127.0
    scale2 = jnp.where(scale2 == 0, 1.0, scale2)
    out["absmax_codes"] = jnp.clip(jnp.round(centred / scale2), -127, 127).astype(jnp.int8)
    out["absmax_scale"] = scale2[..., 0]
    out["absmax_mean"] = mean[..., 0]
    return out


def nf4_dequantize(arrays: dict, w_shape: tuple[int, ...], dtype):
    """The float weight (without leading axes: one layer's, as the scan sees it, or with them;
    `w_shape` is the weight's shape without leading axes) that `nf4_quantize` encoded."""
    codes = arrays["codes"]
    lead = codes.shape[:codes.ndim - 3]
    n, nb, half = codes.shape[-3:]
    if "absmax" in arrays:
        absmax = arrays["absmax"]
    else:
        q = arrays["absmax_codes"].astype(jnp.float32) * arrays["absmax_scale"][..., None]
        absmax = q.reshape(lead + (n, nb)) + arrays["absmax_mean"][..., None, None]
    lo, hi = codes & 0xF, codes >> 4
    idx = jnp.stack([lo, hi], axis=-1).reshape(lead + (n, nb, 2 * half))
    vals = jnp.take(jnp.asarray(NF4_LEVELS), idx.astype(jnp.int32)) * absmax[..., None]
    w_NK = vals.reshape(lead + (n, nb * 2 * half))
    return jnp.swapaxes(w_NK, -1, -2).reshape(lead + tuple(w_shape)).astype(dtype)


class NF4Kernel(nnx.Module):
    """A frozen weight in NF4 (QLoRA's base; a kernel in the sense of models/projection.py):
    dequantized to the compute dtype where it is used, inside the layer scan."""

    def __init__(self, arrays: dict, w_shape, axes):
        n_lead = arrays["codes"].ndim - 3
        lead_axes = tuple(axes[:n_lead]) if axes else (None,) * n_lead
        self.codes = nnx.Param(arrays["codes"], axes=lead_axes + (None, None, None))
        self.absmax = nnx.data(None)
        self.absmax_codes = self.absmax_scale = self.absmax_mean = nnx.data(None)
        if "absmax" in arrays:
            self.absmax = nnx.Param(arrays["absmax"], axes=lead_axes + (None, None))
        else:
            self.absmax_codes = nnx.Param(arrays["absmax_codes"], axes=lead_axes + (None, None))
            self.absmax_scale = nnx.Param(arrays["absmax_scale"], axes=lead_axes + (None,))
            self.absmax_mean = nnx.Param(arrays["absmax_mean"], axes=lead_axes)
        self.w_shape = tuple(int(d) for d in w_shape)  # one layer's weight shape: static
        self.weight_axes = tuple(axes) if axes else None  # the logical axes of the weight it stands for

    def arrays(self) -> dict:
        names = ("codes", "absmax", "absmax_codes", "absmax_scale", "absmax_mean")
        return {n: getattr(self, n)[...] for n in names if getattr(self, n) is not None}

    def dense(self, dtype):
        return nf4_dequantize(self.arrays(), self.w_shape, dtype)

    def einsum(self, spec: str, x, dtype, out_dtype, rng=None):
        return mixed_einsum(spec, x, self.dense(dtype), dtype, out_dtype)


def quantize_base(model, *, block_size: int = 64, double_quant: bool = False):
    """A copy of a Decoder whose stacked layers' projections are NF4 (QLoRA's frozen base); the
    embedding table and the output head stay in floating point, and so do an MoE layer's router
    and experts (they are not projections)."""
    from models.transformer import Decoder

    if not isinstance(model, Decoder):
        raise TypeError(f"quantize_base takes a models.transformer.Decoder, not {type(model).__name__}")
    model = nnx.clone(model)

    def quantize(path, proj, kernel):
        if path[0] not in ("layers", "dense_layers") or type(kernel) is not Kernel:
            return kernel
        n_w = len(proj.spec.split("->")[0].split(",")[1])
        n_lead = kernel[...].ndim - n_w
        n_contract = len(contract_axes(proj.spec))
        arrays = nf4_quantize(kernel[...], n_lead, n_contract, block_size=block_size, double_quant=double_quant)
        return NF4Kernel(arrays, kernel[...].shape[n_lead:], kernel.get_metadata().get("axes"))

    map_kernels(model, quantize)
    return model
