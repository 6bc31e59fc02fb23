"""Projections, and the one way a variant changes what they compute.

A projection is `Einsum(spec, ...)`: y = einsum(spec, x, W) (+ bias), with x cast to the compute
dtype, float32 accumulation and the output in `out_dtype`. It never reads W itself; it asks its
`kernel`, any object with

    kernel.einsum(spec, x, dtype, out_dtype, rng=None) -> y     the product einsum(spec, x, W)
    kernel.dense(dtype) -> W                                    the float weight it stands for

(`rng` is the projection's dropout key while training, None otherwise; plain weights ignore it,
LoRA's dropout on its input path uses it.)

The model is built with plain `Kernel`s (an `nnx.Param` holding W). A variant is another kernel
put in a plain one's place with `map_kernels(model, fn)`; the model code does not change and has
no branch for it:

    models/quant.py              QuantKernel: int8 / packed int4 weights, dequantized where used
    inference/decode_layout.py   PanelKernel: W as column panels for memory-bound CPU decode steps
    models/lora.py               LoraKernel: wraps another kernel (plain, or NF4 for QLoRA) as
                                 `base` and adds scale * (x A) B

A kernel that wraps another keeps it as its `base` attribute, so a transformation of plain
kernels (the decode layout re-lays them; RL rollouts re-lay them for every new set of weights)
reaches through wrappers and leaves the wrapper's own parameters alone. The token table follows
the same rule: `Embedding` is a `Kernel` that also answers `rows(ids, dtype)`, and quantization
swaps in a `QuantEmbedding`.

Changes bigger than one weight (an attention that prepends learned prefix keys and values, an
MoE feed-forward layer) plug in the same way one level up: the submodule is replaced in the NNX
graph by one with the same call signature (`Attention`, `Mlp` in models/transformer.py), and the
scanned layers, the pipeline and the decode layout run whatever module they find.

Parameter paths of variants: a module kernel's arrays sit under the projection's `kernel`
(`layers/attn/q/kernel/values`), so a plain model's checkpoint layout is unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

F32 = jnp.float32


def _transpose_specs(spec: str) -> tuple[str, str]:
    """For 'x,w->y': the einsum specs of dx = f(dy, w) and dw = f(x, dy)."""
    ins, out = spec.split("->")
    x, w = ins.split(",")
    return f"{out},{w}->{x}", f"{x},{out}->{w}"


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def mixed_einsum(spec: str, x, w, dtype, out_dtype):
    """einsum(spec, x, w) with inputs cast to `dtype`, float32 accumulation, output in `out_dtype`.

    The backward pass keeps the same contract: the incoming gradient is cast to `dtype` before
    the two transposed matmuls (each accumulating in float32), as mixed-precision training
    does; the weight gradient comes back in float32 without a detour through `dtype`. Plain
    autodiff of a cast-then-dot would run the backward matmuls in float32 instead.
    """
    return jnp.einsum(spec, x.astype(dtype), w.astype(dtype), preferred_element_type=F32).astype(out_dtype)


def _mixed_einsum_fwd(spec, x, w, dtype, out_dtype):
    return mixed_einsum(spec, x, w, dtype, out_dtype), (x, w)


def _mixed_einsum_bwd(spec, dtype, out_dtype, res, dy):
    x, w = res
    dx_spec, dw_spec = _transpose_specs(spec)
    dy = dy.astype(dtype)
    dx = jnp.einsum(dx_spec, dy, w.astype(dtype), preferred_element_type=F32).astype(x.dtype)
    dw = jnp.einsum(dw_spec, x.astype(dtype), dy, preferred_element_type=F32).astype(w.dtype)
    return dx, dw


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def contracted(spec: str) -> str:
    """The contracted dimension letters of an `x, kernel` einsum spec ("BTD,DNH->BTNH" -> "D")."""
    xs, ws = spec.split("->")[0].split(",")
    return "".join(c for c in ws if c in xs)


def contract_axes(spec: str) -> tuple[int, ...]:
    """Axes of an einsum's weight that the output does not keep ("BTD,DNH->BTNH" -> (0,))."""
    ins, out = spec.split("->")
    w = ins.split(",")[1]
    return tuple(i for i, c in enumerate(w) if c not in out)


def dropout(x, rate: float, rng):
    """Inverted dropout of `x` at `rate` with key `rng`; the identity when rng is None or rate 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Kernel(nnx.Param):
    """A plain weight W: `einsum` multiplies by it, `dense` returns it."""

    def einsum(self, spec: str, x, dtype, out_dtype, rng=None):
        return mixed_einsum(spec, x, self[...], dtype, out_dtype)

    def dense(self, dtype):
        return self[...].astype(dtype)


class Embedding(Kernel):
    """The token table [V, D]: `rows(ids)` looks tokens up; as a kernel it is the tied output head."""

    def rows(self, ids, dtype):
        return jnp.take(self[...], ids, axis=0).astype(dtype)


class Einsum(nnx.Module):
    """A projection `einsum(spec, x, W) (+ bias)` with W from `self.kernel` (see the module doc):
    inputs in the compute dtype, float32 accumulation, output in `out_dtype` (the compute dtype
    unless asked otherwise). `rng`: the dropout key a kernel may use while training (LoRA's).
    The output is named "proj" for the `save_dots` remat policy."""

    def __init__(self, spec: str, shape, axes, *, std: float, dtype, param_dtype, rngs: nnx.Rngs,
                 bias_shape=None, bias_axes=None, out_dtype=None):
        self.spec = spec
        self.dtype = dtype
        self.out_dtype = out_dtype or dtype
        w = jax.random.normal(rngs.params(), shape, F32).astype(param_dtype) * jnp.asarray(std, param_dtype)
        self.kernel = Kernel(w, axes=tuple(axes))
        self.bias = nnx.data(None)
        if bias_shape is not None:
            self.bias = nnx.Param(jnp.zeros(bias_shape, param_dtype), axes=tuple(bias_axes))

    def __call__(self, x, *, rng=None):
        y = self.kernel.einsum(self.spec, x, self.dtype, self.out_dtype, rng=rng)
        if self.bias is not None:
            y = (y.astype(F32) + self.bias[...].astype(F32)).astype(self.out_dtype)
        return checkpoint_name(y, "proj")


def map_kernels(module: nnx.Module, fn: Callable) -> nnx.Module:
    """Puts `fn(path, projection, kernel)` in place of every projection's kernel, in place.

    `path` is the projection's path in the graph (e.g. ("layers", "attn", "q")); returning the
    kernel unchanged leaves that projection alone. Returns `module`.
    """
    for path, m in list(nnx.iter_modules(module)):
        if isinstance(m, Einsum):
            new = fn(tuple(path), m, m.kernel)
            if new is not m.kernel:
                m.kernel = new
    return module


def map_plain_kernels(kernel, fn: Callable):
    """`fn(k)` for a plain `Kernel`, reaching through wrappers' `base`; other kernels unchanged.

    A wrapper (e.g. an adapter around a frozen weight) is rebuilt around the new base by
    assigning its `base` attribute on a copy, so the original kernel object is not modified.
    """
    if type(kernel) is Kernel:
        return fn(kernel)
    base = getattr(kernel, "base", None)
    if base is None:
        return kernel
    new_base = map_plain_kernels(base, fn)
    if new_base is base:
        return kernel
    graphdef, state = nnx.split(kernel)
    wrapper = nnx.merge(graphdef, nnx.to_pure_dict(state))  # new Variables over the same arrays
    wrapper.base = new_base
    return wrapper
