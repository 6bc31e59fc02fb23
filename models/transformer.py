"""One decoder-only Transformer, configurable to the Llama, Mistral, Qwen, Gemma and GPT-2 families.

Flax NNX modules, used functionally: `graphdef, params = split_params(model)` once, then
`apply(graphdef, params, batch)` inside `jax.jit`. Layers are built stacked (every parameter of
`Decoder.layers` has a leading `layers` axis) and run with `jax.lax.scan`, rematerialised per
the config, or, with `pipeline_stages > 1`, as a GPipe pipeline over the mesh's `stage` axis
(models/pipeline.py). Projections are einsums with named dimensions:
  B batch, T query length, S key length, D hidden, N heads, K kv heads, H head_dim,
  F mlp hidden, V vocabulary, L layers.
Precision: parameters in `param_dtype`, matmul inputs in `dtype` with float32 accumulation,
norms / softmax / RoPE / logits in float32, the residual stream in `dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models import pipeline
from models.attention import cached_attention, dot_product_attention
from models.config import ModelConfig
from models.quant import dequantize
from models.sharding import constrain

F32 = jnp.float32


# --------------------------------------------------------------------------------------------
# Layers


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return jax.random.normal(rngs.params(), shape, F32).astype(dtype) * jnp.asarray(std, dtype)


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


def _contracted(spec: str) -> str:
    """The contracted dimension letters of an `x, kernel` einsum spec ("BTD,DNH->BTNH" -> "D")."""
    xs, ws = spec.split("->")[0].split(",")
    return "".join(c for c in ws if c in xs)


# Rows (tokens in the call) up to which `panel_matmul` streams the panels; above, the matrix is
# re-formed and multiplied whole (at 32 rows the plain matmul was already as fast; prefill is
# compute-bound, where one large matmul is faster).
PANEL_MAX_ROWS = 16


def to_panels(w_KN, panel: int):
    """[..., K, N] -> [..., N / panel, K, panel]: each panel's columns contiguous, row after row."""
    *lead, k, n = w_KN.shape
    if n % panel:
        raise ValueError(f"to_panels: {n} output features do not divide into panels of {panel} columns")
    return jnp.swapaxes(w_KN.reshape(*lead, k, n // panel, panel), -3, -2)


def panel_matmul(x, w_PKJ, n_contracted: int, out_features: tuple, dtype, out_dtype):
    """x [..., K...] times a kernel stored as column panels (`to_panels`) -> [..., N...].

    A batch of small matmuls over the panels: each reads its [K, panel] block as one contiguous
    stream, which a memory-bound decode step on a CPU reads ~1.2-1.3x faster than the same
    weights as one row-major [K, N] matrix (benchmarks/RESULTS.md). Float32 accumulation.
    """
    lead = x.shape[:x.ndim - n_contracted]
    p, k, j = w_PKJ.shape
    x_MK = x.reshape(-1, k).astype(dtype)
    if x_MK.shape[0] > PANEL_MAX_ROWS:
        w_KN = jnp.swapaxes(w_PKJ, 0, 1).reshape(k, p * j)
        y_MN = jnp.einsum("MK,KN->MN", x_MK, w_KN.astype(dtype), preferred_element_type=F32)
    else:
        y_PMJ = jnp.einsum("PMK,PKJ->PMJ", jnp.broadcast_to(x_MK, (p,) + x_MK.shape), w_PKJ.astype(dtype),
                           preferred_element_type=F32)
        y_MN = jnp.swapaxes(y_PMJ, 0, 1).reshape(x_MK.shape[0], p * j)
    return y_MN.reshape(lead + tuple(out_features)).astype(out_dtype)


class Einsum(nnx.Module):
    """A projection `einsum(spec, x, kernel) (+ bias)`: inputs in the compute dtype, float32
    accumulation, output in `out_dtype` (the compute dtype unless asked otherwise)."""

    def __init__(self, spec: str, shape, axes, *, std: float, dtype, param_dtype, rngs: nnx.Rngs,
                 bias_shape=None, bias_axes=None, out_dtype=None):
        self.spec = spec
        self.dtype = dtype
        self.out_dtype = out_dtype or dtype
        self.kernel = nnx.Param(_normal(rngs, shape, std, param_dtype), axes=tuple(axes))
        self.bias = nnx.data(None)
        if bias_shape is not None:
            self.bias = nnx.Param(jnp.zeros(bias_shape, param_dtype), axes=tuple(bias_axes))
        # weight-only quantization (models/quant.py): None, or the kernel is int8 / packed int4
        # with `kernel_scale`
        self.quant = None
        self.kernel_scale = nnx.data(None)
        # decode layout (`decode_layout`): None, or the kernel is stored as [P, K, panel] column
        # panels of the [K, N] matrix (K = contracted features, N = output features)
        self.panel = None
        self.out_features = tuple(shape[len(_contracted(spec)):])

    def weight(self):
        """The kernel in the compute dtype (dequantized if quantized)."""
        if self.quant is None:
            return self.kernel[...]
        return dequantize(self.kernel[...], self.kernel_scale[...], self.quant, self.dtype)

    def __call__(self, x):
        if self.panel is None:
            y = mixed_einsum(self.spec, x, self.weight(), self.dtype, self.out_dtype)
        else:
            y = panel_matmul(x, self.kernel[...], len(_contracted(self.spec)), self.out_features, self.dtype,
                             self.out_dtype)
        if self.bias is not None:
            y = (y.astype(F32) + self.bias[...].astype(F32)).astype(self.out_dtype)
        return checkpoint_name(y, "proj")


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32.

    The output is multiplied by `offset + scale` (Gemma stores w and multiplies by 1 + w: offset
    1.0); the scale starts at `1 - offset`, so every norm starts as the identity.
    """

    def __init__(self, dim: int, kind: str, eps: float, param_dtype, *, offset: float = 0.0,
                 rngs: nnx.Rngs | None = None):
        self.kind, self.eps, self.offset = kind, eps, offset
        self.scale = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype), axes=(None,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=(None,)) if kind == "layernorm" else None

    def __call__(self, x):
        x32 = x.astype(F32)
        if self.kind == "layernorm":
            x32 = x32 - x32.mean(-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(F32)
        y = y * (scale + self.offset if self.offset else scale)
        if self.bias is not None:
            y = y + self.bias[...].astype(F32)
        return y.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[float, ...]:
    """RoPE's inverse frequencies (head_dim / 2 of them) with the config's scaling, as Hugging Face
    computes them (float32 arithmetic): "linear" divides all by the factor (positions / factor);
    "llama3" (Llama 3.1) divides the low frequencies (wavelength > original_len / low_freq_factor)
    by the factor, keeps the high ones (wavelength < original_len / high_freq_factor) and
    interpolates smoothly between. A tuple of floats: static, hashable, traced as a constant."""
    h = cfg.head_dim
    f32 = np.float32
    # the power correctly rounded to float32 (as PyTorch's, nearly always), the rest in float32
    exponent = np.arange(0, h, 2).astype(f32) / f32(h)
    inv = f32(1.0) / (float(cfg.rope_theta) ** exponent.astype(np.float64)).astype(f32)
    factor = f32(cfg.rope_scaling_factor)
    if cfg.rope_scaling == "linear":
        inv = inv / factor
    elif cfg.rope_scaling == "llama3":
        old_len = f32(cfg.rope_original_max_seq_len or cfg.max_seq_len)
        low, high = f32(cfg.rope_low_freq_factor), f32(cfg.rope_high_freq_factor)
        # PyTorch evaluates scalar / tensor as tensor.reciprocal() * scalar: so do we, to the last bit
        wavelen = (f32(1) / inv) * f32(2 * math.pi)
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = ((f32(1) / wavelen) * old_len - low) / (high - low)
        smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled)
    return tuple(float(x) for x in inv.astype(f32))


def rope(x_BTNH, positions_BT, theta: float = 10000.0, *, inv_freq=None):
    """Rotary embedding, Hugging Face's rotate-half layout (first half / second half of head_dim).

    `inv_freq` (head_dim / 2 values, e.g. `rope_frequencies(cfg)`) overrides the plain
    1 / theta^(2i/H) frequencies."""
    h = x_BTNH.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=F32) / h))
    else:
        inv_freq = jnp.asarray(inv_freq, F32)
    angle_BTh = positions_BT.astype(F32)[..., None] * inv_freq
    sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
    x1, x2 = jnp.split(x_BTNH.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def _activation(name):
    return {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
            "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[name]


def dropout(x, rate: float, rng):
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots, filled left to right.

    Heads-first, [L, B, K, S, H]: each (row, kv head) reads its keys as one contiguous [S, H]
    block, so attention over the cache needs no transpose (with [L, B, S, K, H] the transposes
    cost a third of a CPU decode step; benchmarks/RESULTS.md). The layer scan carries the cache
    and each layer writes its new keys and values in place. `segment_ids` is 0 for slots not
    written yet (and for padding tokens), so they are masked; `positions` holds each written
    token's position (RoPE and causal/window masks use them). A `decode_layout` model keeps
    one [B, K, S, H] buffer per layer instead (`per_layer`): no per-step slice of the stack.
    """

    k: jax.Array | tuple  # [L, B, K, S, H], or per layer: L arrays [B, K, S, H]
    v: jax.Array | tuple
    segment_ids: jax.Array  # [B, S] int32
    positions: jax.Array  # [B, S] int32
    index: jax.Array  # [] int32: the next slot to write

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[3]

    def per_layer(self) -> KVCache:
        """The same cache as one buffer per layer (what a `decode_layout` model carries)."""
        if isinstance(self.k, tuple):
            return self
        split = lambda a: tuple(a[i] for i in range(a.shape[0]))  # noqa: E731
        return dataclasses.replace(self, k=split(self.k), v=split(self.v))


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   positions=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
        bias = cfg.attention_bias
        self.q = Einsum("BTD,DNH->BTNH", (d, n, h), ("embed", "heads", "head_dim"), std=cfg.init_std,
                        bias_shape=(n, h) if bias else None, bias_axes=("heads", "head_dim"), **kw)
        self.k = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), std=cfg.init_std,
                        bias_shape=(k, h) if bias else None, bias_axes=("kv_heads", "head_dim"), **kw)
        self.v = Einsum("BTD,DKH->BTKH", (d, k, h), ("embed", "kv_heads", "head_dim"), std=cfg.init_std,
                        bias_shape=(k, h) if bias else None, bias_axes=("kv_heads", "head_dim"), **kw)
        self.o = Einsum("BTNH,NHD->BTD", (n, h, d), ("heads", "head_dim", "embed"),
                        std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
                        bias_shape=(d,) if cfg.attention_out_bias else None, bias_axes=(None,), **kw)
        self.q_norm = self.k_norm = nnx.data(None)
        if cfg.qk_norm:
            self.q_norm = Norm(h, cfg.norm, cfg.norm_eps, cfg.params_dtype, offset=cfg.norm_weight_offset)
            self.k_norm = Norm(h, cfg.norm, cfg.norm_eps, cfg.params_dtype, offset=cfg.norm_weight_offset)
        self.rope_freqs = rope_frequencies(cfg) if cfg.position_embedding == "rope" else None
        self.softcap = cfg.attn_logit_softcap or None
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.impl = cfg.attention_impl

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, window, kv_cache=None, cache_index=None,
                 kv_positions_BS=None, kv_segment_ids_BS=None):
        dt = x_BTD.dtype
        q = constrain(self.q(x_BTD), ("batch", "length", "heads", "head_dim"))
        k = constrain(self.k(x_BTD), ("batch", "length", "kv_heads", "head_dim"))
        v = constrain(self.v(x_BTD), ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_freqs is not None:
            q, k = rope(q, positions_BT, inv_freq=self.rope_freqs), rope(k, positions_BT, inv_freq=self.rope_freqs)
        if kv_cache is None:
            out = dot_product_attention(q, k, v, segment_ids=segment_ids_BT, positions=positions_BT, causal=True,
                                        window=window, softcap=self.softcap, scale=self.scale, impl=self.impl)
            new_cache = None
        else:
            # the whole [L, B, K, S, H] cache and this layer's index: the new keys and values are
            # written in place (the cache is a loop carry, never copied), then this layer's slice
            # read; or (layer index None) this layer's own [B, K, S, H] buffer
            k_all, v_all, layer_i = kv_cache
            new_k, new_v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
            at = (0, 0, cache_index, 0)
            if layer_i is not None:
                new_k, new_v, at = new_k[None], new_v[None], (layer_i, *at)
            k_all = jax.lax.dynamic_update_slice(k_all, new_k.astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, new_v.astype(v_all.dtype), at)
            k_l, v_l = (k_all, v_all) if layer_i is None else (k_all[layer_i], v_all[layer_i])
            out = cached_attention(q, k_l.astype(dt), v_l.astype(dt),
                                   segment_ids=(segment_ids_BT, kv_segment_ids_BS),
                                   positions=(positions_BT, kv_positions_BS), window=window, softcap=self.softcap,
                                   scale=self.scale, impl=self.impl)
            new_cache = (k_all, v_all)
        out = checkpoint_name(constrain(out, ("batch", "length", "heads", "head_dim")), "attention")
        return self.o(out), new_cache


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
        b = cfg.mlp_bias
        self.gate = nnx.data(None)
        if cfg.gated_mlp:
            self.gate = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), std=cfg.init_std,
                               bias_shape=(f,) if b else None, bias_axes=("mlp",), **kw)
        self.up = Einsum("BTD,DF->BTF", (d, f), ("embed", "mlp"), std=cfg.init_std,
                         bias_shape=(f,) if b else None, bias_axes=("mlp",), **kw)
        self.down = Einsum("BTF,FD->BTD", (f, d), ("mlp", "embed"), std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
                           bias_shape=(d,) if b else None, bias_axes=(None,), **kw)
        self.act = cfg.activation

    def __call__(self, x_BTD):
        h = _activation(self.act)(self.up(x_BTD) if self.gate is None else self.gate(x_BTD))
        if self.gate is not None:
            h = h * self.up(x_BTD)
        h = constrain(h, ("batch", "length", "mlp"))
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + Mlp(Norm(x)).

    With `post_norms` (Gemma 2) each branch's output is normalised again before the add:
    x + Norm(Attn(Norm(x))), then x + Norm(Mlp(Norm(x))).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        norm = functools.partial(Norm, cfg.hidden_size, cfg.norm, cfg.norm_eps, cfg.params_dtype,
                                 offset=cfg.norm_weight_offset)
        self.attn_norm = norm()
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = Mlp(cfg, rngs=rngs)
        self.attn_post_norm = self.mlp_post_norm = nnx.data(None)
        if cfg.post_norms:
            self.attn_post_norm, self.mlp_post_norm = norm(), norm()
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x_BTD, *, dropout_rng=None, **attn_kw):
        a, new_cache = self.attn(self.attn_norm(x_BTD), **attn_kw)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        r1 = r2 = None
        if dropout_rng is not None:
            r1, r2 = jax.random.split(dropout_rng)
        x_BTD = x_BTD + dropout(a, self.dropout_rate, r1)
        m = self.mlp(self.mlp_norm(x_BTD))
        if self.mlp_post_norm is not None:
            m = self.mlp_post_norm(m)
        x_BTD = x_BTD + dropout(m, self.dropout_rate, r2)
        return constrain(x_BTD, ("batch", "length", None)), new_cache


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep the projections' and attention's outputs; recompute norms, activations, residual adds
    "save_dots": jax.checkpoint_policies.save_only_these_names("proj", "attention"),
}


# --------------------------------------------------------------------------------------------
# The decoder


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = cfg.params_dtype
        self.embed = nnx.Param(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.init_std, pdt),
                               axes=("vocab", "embed"))
        self.pos_embed = nnx.data(None)
        if cfg.position_embedding == "learned":
            self.pos_embed = nnx.Param(_normal(rngs, (cfg.max_seq_len, cfg.hidden_size), cfg.init_std / 2, pdt),
                                       axes=(None, "embed"))
        self.embed_quant = None  # models/quant.py: the table is int8 / packed int4 with `embed_scale_q`
        self.embed_scale_q = nnx.data(None)
        self.layers = _stacked_blocks(cfg, rngs)
        self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, pdt, offset=cfg.norm_weight_offset)
        # `decode_layout`: the layers as a list of per-layer blocks with panel kernels, and the
        # output head as panels (both for decode steps); None in the model as built and trained
        self.layer_list = nnx.data(None)
        self.head_panels = nnx.data(None)
        self.lm_head = nnx.data(None)
        if not cfg.tie_embeddings:
            self.lm_head = Einsum("BTD,DV->BTV", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  std=cfg.init_std, dtype=cfg.compute_dtype, param_dtype=pdt, rngs=rngs,
                                  out_dtype=F32)

    def embed_rows(self, inputs_BT):
        """Embeddings of token ids [B, T] -> [B, T, D] in the compute dtype."""
        dt = self.config.compute_dtype
        if self.embed_quant is None:
            return jnp.take(self.embed[...], inputs_BT, axis=0).astype(dt)
        return dequantize(jnp.take(self.embed[...], inputs_BT, axis=0),
                          jnp.take(self.embed_scale_q[...], inputs_BT, axis=0), self.embed_quant, dt)

    def embed_table(self):
        """The whole embedding table [V, D] (the tied output head)."""
        if self.embed_quant is None:
            return self.embed[...]
        return dequantize(self.embed[...], self.embed_scale_q[...], self.embed_quant, self.config.compute_dtype)

    def __call__(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None,
                 dropout_rng=None):
        """Logits [B, T, V] in float32, or (logits, updated cache) when `cache` is given.

        Without a cache, positions default to 0..T-1 and segment ids to one document per row.
        With a cache, the T new tokens are written at `cache.index`; positions default to
        index..index+T-1 and segment ids to 1 (left-padded prompts pass 0 for the padding).
        `dropout_rng` turns dropout on (training); None is deterministic.
        """
        cfg = self.config
        b, t = inputs_BT.shape
        dt = cfg.compute_dtype
        if positions_BT is None:
            start = 0 if cache is None else cache.index
            positions_BT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((b, t), jnp.int32)

        x = self.embed_rows(inputs_BT)
        if cfg.embed_scale != 1.0:
            x = x * jnp.asarray(cfg.embed_scale, dt)  # rounded to the compute dtype, as Gemma does
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(dt)
        x = constrain(x, ("batch", "length", None))
        if dropout_rng is not None:
            dropout_rng, embed_rng = jax.random.split(dropout_rng)
            x = dropout(x, cfg.dropout_rate, embed_rng)

        # One window for every layer is a static int; different windows per layer (Gemma 2's
        # local/global alternation) are an int array scanned with the layers.
        if len(set(cfg.layer_windows)) > 1:
            window, per_layer_windows = None, jnp.asarray(cfg.layer_windows, jnp.int32)
        else:
            window, per_layer_windows = cfg.window(0) or None, None
        attn_kw: dict[str, Any] = dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, window=window)
        caches = None
        if cache is not None:
            attn_kw["cache_index"] = cache.index
            attn_kw["kv_segment_ids_BS"] = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids_BT,
                                                                        (0, cache.index))
            attn_kw["kv_positions_BS"] = jax.lax.dynamic_update_slice(cache.positions, positions_BT,
                                                                      (0, cache.index))
            caches = (cache.k, cache.v)

        graphdef, layer_state = nnx.split(self.layers)

        def layer(x, xs, batch_kw, rng):
            """One block; `batch_kw` overrides positions / segment ids (a pipeline micro-batch's)."""
            state_l, cache_l, index_l, window_l = xs
            rng_l = None if rng is None else jax.random.fold_in(rng, index_l)
            kw = {**attn_kw, **batch_kw}
            if window_l is not None:
                kw["window"] = window_l
            return nnx.merge(graphdef, state_l)(x, dropout_rng=rng_l, kv_cache=cache_l, **kw)

        if cfg.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=False)
        layer_index = jnp.arange(cfg.num_layers)
        if cfg.pipeline_stages > 1:
            if cache is not None:
                raise ValueError(f"KV-cache decoding is not supported with model.pipeline_stages="
                                 f"{cfg.pipeline_stages}: decode with a model built from "
                                 f"cfg.replace(pipeline_stages=1) (the parameters are the same)")

            def pipelined_layer(x, layer_x, batch_x, microbatch):
                state_l, index_l, window_l = layer_x
                # dropout: a key per (micro-batch, layer); masks differ from the unpipelined model's
                rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, microbatch)
                return layer(x, (state_l, None, index_l, window_l), batch_x, rng)[0]

            x = pipeline.gpipe(pipelined_layer, x, (layer_state, layer_index, per_layer_windows),
                               {"positions_BT": positions_BT, "segment_ids_BT": segment_ids_BT},
                               stages=cfg.pipeline_stages,
                               microbatches=pipeline.num_microbatches(cfg.pipeline_stages, cfg.pipeline_microbatches))
            new_caches = None
        elif caches is None:
            x, _ = jax.lax.scan(lambda x, xs: layer(x, (xs[0], None, *xs[1:]), {}, dropout_rng), x,
                                (layer_state, layer_index, per_layer_windows))
        elif isinstance(cache.k, tuple):  # one cache buffer per layer: the decode layout's own blocks
            if self.layer_list is None:
                raise ValueError("a per-layer KV cache (KVCache.per_layer) needs a model from "
                                 "models.transformer.decode_layout; pass the stacked cache to this model")
            new_k, new_v = [], []
            for i, block in enumerate(self.layer_list):
                kw = {**attn_kw, "window": cfg.window(i) or None}
                x, (k_i, v_i) = block(x, kv_cache=(cache.k[i], cache.v[i], None), **kw)
                new_k.append(k_i)
                new_v.append(v_i)
            new_caches = (tuple(new_k), tuple(new_v))
        else:  # decoding: the stacked cache rides in the carry and each layer updates its slice in place
            def cached(carry, xs):
                x, k_all, v_all = carry
                state_l, index_l, window_l = xs
                x, (k_all, v_all) = layer(x, (state_l, (k_all, v_all, index_l), index_l, window_l), {}, dropout_rng)
                return (x, k_all, v_all), None

            (x, *new_caches), _ = jax.lax.scan(cached, (x, *caches), (layer_state, layer_index, per_layer_windows))

        x = self.final_norm(x)
        if self.head_panels is not None and cache is not None and isinstance(cache.k, tuple):
            logits = panel_matmul(x, self.head_panels[...], 1, (cfg.vocab_size,), dt, F32)
        elif self.lm_head is not None:
            logits = self.lm_head(x)
        else:
            logits = mixed_einsum("BTD,VD->BTV", x, self.embed_table(), dt, F32)
        if cfg.logit_softcap:
            logits = cfg.logit_softcap * jnp.tanh(logits / cfg.logit_softcap)
        logits = constrain(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits
        new_cache = KVCache(k=new_caches[0], v=new_caches[1], segment_ids=attn_kw["kv_segment_ids_BS"],
                            positions=attn_kw["kv_positions_BS"], index=cache.index + t)
        return logits, new_cache


def decode_layout(model: Decoder, panel: int = 32) -> Decoder:
    """The model with its weights laid out for memory-bound decoding on a CPU (same parameters).

    A decode step multiplies a few rows by every weight matrix, so its speed is how fast the
    weights stream from memory. Here each layer is a block of its own (`layer_list`, unrolled:
    no per-step slice of the stacked weights in the layer loop), and every float kernel whose
    output features divide by `panel` is stored as column panels (`to_panels`), which XLA:CPU
    streams faster than a row-major matrix; so is the output head (`head_panels`, from the head
    or the tied embedding table). Quantized kernels stay as they are. KV-cache calls with the
    cache as one buffer per layer (`KVCache.per_layer`) run these blocks and head; calls without
    a cache or with the stacked cache (prefill) run the stacked layers and the head as they are,
    which the result shares with `model`, as it shares the embedding and norms: it adds one copy
    of the kernels. `inference.generate` builds it once per model and set of weights.
    """
    if isinstance(panel, bool) or not isinstance(panel, int) or panel < 1:
        raise ValueError(f"decode_layout: panel={panel!r} must be a positive int (columns per panel, e.g. 32)")
    cfg = model.config
    new = nnx.merge(*nnx.split(model))
    if new.lm_head is not None:
        head = new.lm_head.kernel[...] if new.lm_head.quant is None and new.lm_head.bias is None else None
    else:
        head = new.embed[...].T if new.embed_quant is None else None
    if head is not None and cfg.vocab_size % panel:
        head = None
    # one compiled program slices and re-lays every kernel (eagerly, op by op, it took ~0.5 s);
    # it gets its own module over the same arrays, since nnx.jit writes back into its inputs
    stacked = merge_params(*split_params(new.layers))
    new.layer_list, head_panels = _unstacked_panels(stacked, head, panel=panel, num_layers=cfg.num_layers)
    if head_panels is not None:
        new.head_panels = nnx.Param(head_panels, axes=(None, None, None))
    return new


@functools.partial(nnx.jit, static_argnames=("panel", "num_layers"))
def _unstacked_panels(stacked: Block, head, *, panel: int, num_layers: int):
    """(nnx.List of one Block per layer with panel kernels, the head's panels or None)."""
    graphdef, state = nnx.split(stacked)
    blocks = []
    for i in range(num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        for _, var in nnx.iter_graph(block):
            axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
            if axes and axes[0] == "layers":
                var.set_metadata(axes=tuple(axes[1:]))
        _to_panels(block, panel)
        blocks.append(block)
    return nnx.List(blocks), None if head is None else to_panels(head, panel)


def _to_panels(module: nnx.Module, panel: int):
    for _, m in nnx.iter_modules(module):
        if isinstance(m, Einsum) and m.quant is None and m.panel is None:
            n = math.prod(m.out_features)
            if n % panel == 0:
                m.kernel = nnx.Param(to_panels(m.kernel[...].reshape(-1, n), panel), axes=(None, None, None))
                m.panel = panel


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """A Block whose every parameter has a leading `layers` axis (one slice per layer)."""
    keys = jax.random.split(rngs.params(), cfg.num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0))))
    state = jax.vmap(lambda key: nnx.state(Block(cfg, rngs=nnx.Rngs(params=key))))(keys)
    for var in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        var.set_metadata(axes=("layers",) + tuple(var.get_metadata()["axes"]))
    return nnx.merge(graphdef, state)


# --------------------------------------------------------------------------------------------
# Functional interface


def build(cfg: ModelConfig, *, seed: int = 0) -> Decoder:
    """An eagerly initialised model on the default device (tests, small tools)."""
    return Decoder(cfg, rngs=nnx.Rngs(params=seed))


def split_params(model: Decoder):
    """(graphdef, params) with params a plain nested dict of arrays."""
    graphdef, state = nnx.split(model)
    return graphdef, nnx.to_pure_dict(state)


def merge_params(graphdef, params) -> Decoder:
    return nnx.merge(graphdef, params)


def abstract_model(cfg: ModelConfig) -> Decoder:
    """The model with ShapeDtypeStruct leaves: no memory, any size."""
    return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(params=0)))


def logical_axes(model: Decoder):
    """Nested dict, like the params, of each parameter's logical axis names."""
    out: dict = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = tuple(var.get_metadata()["axes"])
    return out


def abstract_params_and_shardings(cfg: ModelConfig, mesh=None, rules=None):
    """(graphdef, abstract params, shardings): per the mesh's logical-axis rules, or all on the
    first local device without a mesh (a model that then works with no mesh set)."""
    from models.sharding import named_shardings

    abstract = abstract_model(cfg)
    graphdef, abs_params = split_params(abstract)
    if mesh is not None:
        shardings = named_shardings(logical_axes(abstract), abs_params, mesh, rules)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: device, abs_params)
    return graphdef, abs_params, shardings


def apply(graphdef, params, batch: dict, *, dropout_rng=None):
    """Logits [B, T, V] float32 for a batch dict (`inputs_BT`, optional positions/segment ids)."""
    model = nnx.merge(graphdef, params)
    return model(batch["inputs_BT"], positions_BT=batch.get("positions_BT"),
                 segment_ids_BT=batch.get("segment_ids_BT"), dropout_rng=dropout_rng)


def init_params(cfg: ModelConfig, seed_or_key, *, mesh=None, rules=None):
    """(graphdef, params) with params created directly on their devices per the mesh rules.

    No device ever holds more than its shard, so this initialises models larger than one
    device's memory. With `mesh=None` the params land on the default device.
    """
    from models.sharding import named_shardings

    key = jax.random.key(seed_or_key) if isinstance(seed_or_key, int) else seed_or_key
    abstract = abstract_model(cfg)
    graphdef, abstract_state = nnx.split(abstract)

    def init(key):
        return nnx.to_pure_dict(nnx.state(Decoder(cfg, rngs=nnx.Rngs(params=key))))

    out_shardings = None
    if mesh is not None:
        shapes = nnx.to_pure_dict(abstract_state)
        out_shardings = named_shardings(logical_axes(abstract), shapes, mesh, rules)
    params = jax.jit(init, out_shardings=out_shardings)(key)
    return graphdef, params
