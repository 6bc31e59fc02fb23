"""LoRA: low-rank adapters on chosen projections, as wrapper kernels (models/projection.py).

A projection y = einsum(spec, x, W) becomes

    y = x W + scale * dropout(x) A B,     A: [in..., r], B: [r, out...],  scale = alpha / r
                                                                  (alpha / sqrt(r) with rsLoRA)

with W frozen (a plain `Kernel`, or any kernel: int8 / int4 / NF4 for QLoRA) and only A and B
trained. A starts as PEFT's Kaiming-uniform U(-1/sqrt(in), 1/sqrt(in)) and B at zero, so a
fresh adapter leaves the model's function unchanged. `in...` / `out...` are the projection's own
contracted and kept dimensions (the attention output's [N, H] in, the query's [N, H] out), so
the adapters of a stacked model are stacked too ([L, ...] leading) and ride the layer scan.

    model = apply_lora(model, rank=16, alpha=32, targets=("q", "v"))
    trainable = nnx.state(model, LoraParam)          # the adapters only
    merged = merge_lora(model)                       # plain kernels W + scale A B
    base = unmerge_lora(merged, model)               # W again, from the merged weights

Targets are name patterns matched against a projection's path in the model ("layers/attn/q",
"layers/mlp/down", "lm_head"): a pattern matches a path that ends with it (whole components)
or matches it as an fnmatch pattern ("layers/attn/*"). The adapters' own parameters sit under
the projection's `kernel` (`layers/attn/q/kernel/a`), beside the frozen `kernel/base`.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import zlib
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from models.projection import F32, Einsum, Kernel, contracted, dropout, map_kernels, mixed_einsum

# the projections of a Decoder by their last path component (`lm_head` exists when untied);
# latent attention (models/mla.py) has its own: q (or q_a and q_b), kv_a, kv_b, o
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")
DEFAULT_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoraParam(nnx.Param):
    """An adapter weight: the parameters a LoRA / QLoRA run trains (`nnx.state(model, LoraParam)`)."""


def _letters(spec: str):
    """(x letters, w letters, y letters, contracted letters in w's order, kept letters in w's
    order, a letter free for the rank) of an `x,w->y` einsum spec."""
    ins, y = spec.split("->")
    x, w = ins.split(",")
    c = contracted(spec)
    o = "".join(ch for ch in w if ch not in c)
    r = next(ch for ch in "RZYXWQPJ" if ch not in spec)
    return x, w, y, c, o, r


def scaling(rank: int, alpha: float, rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023)."""
    return float(alpha) / (math.sqrt(rank) if rslora else rank)


class LoraKernel(nnx.Module):
    """A frozen kernel `base` plus `scale * A B` (see the module docstring); a kernel itself."""

    def __init__(self, base, a, b, *, spec: str, scale: float, dropout_rate: float, a_axes, b_axes):
        self.base = base
        self.a = LoraParam(a, axes=a_axes)
        self.b = LoraParam(b, axes=b_axes)
        self.spec = spec  # the projection's einsum spec (static)
        self.scale = float(scale)
        self.dropout_rate = float(dropout_rate)

    def einsum(self, spec: str, x, dtype, out_dtype, rng=None):
        xs, _, ys, c, o, r = _letters(spec)
        kept = "".join(ch for ch in xs if ch not in c)
        y = self.base.einsum(spec, x, dtype, F32)
        x_a = dropout(x, self.dropout_rate, rng)
        xa = mixed_einsum(f"{xs},{c}{r}->{kept}{r}", x_a, self.a[...], dtype, dtype)
        delta = mixed_einsum(f"{kept}{r},{r}{o}->{ys}", xa, self.b[...], dtype, F32)
        return (y + self.scale * delta).astype(out_dtype)

    def delta(self, dtype=F32):
        """scale * A B in the kernel's own layout (leading stacked-layer axes kept), in `dtype`."""
        _, w, _, c, o, r = _letters(self.spec)
        ab = jnp.einsum(f"...{c}{r},...{r}{o}->...{w}", self.a[...].astype(F32), self.b[...].astype(F32))
        return (self.scale * ab).astype(dtype)

    def dense(self, dtype):
        return (self.base.dense(F32) + self.delta(F32)).astype(dtype)


def _matches(path: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*/" + pattern)


def target_paths(model: nnx.Module, targets: Sequence[str]) -> list[str]:
    """The projection paths ("layers/attn/q", ...) that `targets` select. Patterns that select
    nothing are logged (a model without an untied `lm_head`, say); when none selects anything,
    an error names the projections there are."""
    paths = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, Einsum)]
    if isinstance(targets, str):
        targets = (targets,)
    unmatched = [t for t in targets if not any(_matches(p, t) for p in paths)]
    chosen = [p for p in paths if any(_matches(p, t) for t in targets)]
    if not chosen:
        raise ValueError(f"LoRA targets {list(targets)} select no projection of this model; its projections are "
                         f"{paths} (a pattern matches a path's last components, e.g. 'q', 'attn/q', 'mlp/*')")
    if unmatched:
        logging.warning("LoRA targets %s select no projection of this model (its projections: %s)", unmatched, paths)
    return chosen


def apply_lora(model: nnx.Module, *, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS,
               dropout_rate: float = 0.0, rslora: bool = False, seed: int = 0,
               param_dtype=None) -> nnx.Module:
    """A copy of `model` with LoRA adapters on the projections `targets` select (see the module
    docstring). A projection that already carries an adapter is an error; its kernel may be
    anything else (plain, int8 / int4, NF4: QLoRA). `param_dtype` (default: the base kernel's
    dtype, float32 for quantized bases) is the adapters' storage dtype."""
    if int(rank) < 1:
        raise ValueError(f"LoRA rank={rank} is not valid; expected an integer >= 1")
    if not 0.0 <= float(dropout_rate) < 1.0:
        raise ValueError(f"LoRA dropout={dropout_rate} is not valid; expected 0 <= dropout < 1")
    chosen = set(target_paths(model, targets))
    model = nnx.clone(model)
    key = jax.random.key(seed)
    scale = scaling(rank, alpha, rslora)

    def adapt(path, proj, kernel):
        name = "/".join(map(str, path))
        if name not in chosen:
            return kernel
        if isinstance(kernel, LoraKernel):
            raise ValueError(f"projection {name} already has a LoRA adapter; merge it first (merge_lora)")
        _, w, _, c, o, _ = _letters(proj.spec)
        full = _kernel_shape(kernel, proj.spec)
        lead = full[:len(full) - len(w)]
        dims = dict(zip(w, full[len(lead):]))
        axes = tuple(kernel_axes(kernel) or (None,) * len(full))
        lead_axes, w_axes = axes[:len(lead)], dict(zip(w, axes[len(lead):]))
        fan_in = math.prod(dims[ch] for ch in c)
        dt = param_dtype or _float_dtype(kernel)
        a = jax.random.uniform(jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF),
                               lead + tuple(dims[ch] for ch in c) + (int(rank),), F32,
                               -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in)).astype(dt)
        b = jnp.zeros(lead + (int(rank),) + tuple(dims[ch] for ch in o), dt)
        return LoraKernel(kernel, a, b, spec=proj.spec, scale=scale, dropout_rate=dropout_rate,
                          a_axes=lead_axes + tuple(w_axes[ch] for ch in c) + (None,),
                          b_axes=lead_axes + (None,) + tuple(w_axes[ch] for ch in o))

    return map_kernels(model, adapt)


def _kernel_shape(kernel, spec: str) -> tuple[int, ...]:
    """The full (stacked) shape of the weight a kernel stands for."""
    return tuple(jax.eval_shape(lambda: kernel.dense(F32)).shape)


def kernel_axes(kernel):
    """The logical axes of the weight a kernel stands for (a plain kernel's metadata, a wrapper's
    or quantized kernel's main parameter)."""
    if isinstance(kernel, nnx.Variable):
        return kernel.get_metadata().get("axes")
    if getattr(kernel, "weight_axes", None) is not None:
        return kernel.weight_axes
    for attr in ("base", "values"):
        inner = getattr(kernel, attr, None)
        if inner is not None:
            return kernel_axes(inner)
    return None


def _float_dtype(kernel):
    if isinstance(kernel, nnx.Variable) and jnp.issubdtype(kernel[...].dtype, jnp.floating):
        return kernel[...].dtype
    base = getattr(kernel, "base", None)
    return _float_dtype(base) if base is not None else F32


def merge_lora(model: nnx.Module, *, dtype=None) -> nnx.Module:
    """A copy of `model` whose adapted projections hold plain kernels W + scale A B (in `dtype`,
    default the base kernel's float dtype; a quantized base is dequantized)."""
    model = nnx.clone(model)

    def merge(path, proj, kernel):
        if not isinstance(kernel, LoraKernel):
            return kernel
        axes = kernel_axes(kernel.base)
        return Kernel(kernel.dense(dtype or _float_dtype(kernel.base)), axes=tuple(axes) if axes else None)

    return map_kernels(model, merge)


def unmerge_lora(merged: nnx.Module, adapted: nnx.Module) -> nnx.Module:
    """The base weights back from a merged model: a copy of `adapted` (a model with adapters)
    whose frozen kernels are `merged`'s minus scale A B. Projections without adapters in
    `adapted` take `merged`'s kernels as they are."""
    merged_kernels = {tuple(p): m.kernel for p, m in nnx.iter_modules(merged) if isinstance(m, Einsum)}
    out = nnx.clone(adapted)

    def unmerge(path, proj, kernel):
        w = merged_kernels[tuple(path)]
        if not isinstance(kernel, LoraKernel):
            return Kernel(w[...], **w.get_metadata()) if isinstance(w, Kernel) else w
        if not isinstance(kernel.base, Kernel):
            raise ValueError(f"projection {'/'.join(map(str, path))}: unmerge needs a float base kernel, "
                             f"not {type(kernel.base).__name__} (a quantized base cannot take the merged weights back)")
        base = w[...].astype(F32) - kernel.delta(F32)
        kernel.base = Kernel(base.astype(kernel.base[...].dtype), **kernel.base.get_metadata())
        return kernel

    return map_kernels(out, unmerge)


def adapter_count(model: nnx.Module) -> int:
    """Number of adapter parameters (elements)."""
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, LoraParam))))
