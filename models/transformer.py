"""One decoder-only Transformer, configurable to the Llama, Mistral, Qwen, Gemma and GPT-2 families.

Flax NNX modules, used functionally: `graphdef, params = split_params(model)` once, then
`apply(graphdef, params, batch)` inside `jax.jit`. Layers are built stacked (every parameter of
`Decoder.layers` has a leading `layers` axis) and run with `jax.lax.scan`, rematerialised per
the config, or, with `pipeline_stages > 1`, as a GPipe pipeline over the mesh's `stage` axis
(models/pipeline.py). Projections are einsums with named dimensions (models/projection.py):
  B batch, T query length, S key length, D hidden, N heads, K kv heads, H head_dim,
  F mlp hidden, V vocabulary, L layers;
intermediate arrays carry the letters of their shape (`x_BTD`, `q_BTNH`, `logits_BTV`).
Variants (quantized weights, adapters, prefix attention) plug in by replacing a projection's
kernel or a submodule in the NNX graph, never by a branch here: models/projection.py says how.
Two choices are made here, since their parameters differ: the attention the config names
(`attention_layer`: grouped-query `Attention`, or multi-head latent attention from
models/mla.py), and mixture-of-experts layers (models/moe.py): a block built with `is_moe=True`
has an `MoeMlp` where others have an `Mlp`; layers of one kind are stacked together
(`layer_stacks`: the dense-MLP layers in `dense_layers`, the MoE layers in `layers`) and each
run of consecutive layers of one kind (`layer_groups`) is one scan over its rows of its stack
(a dense prefix and the MoE layers: two scans). MoE auxiliary losses come back through
`apply_with_aux`, not the model call. The model always runs its stacked layers; the CPU decode
layout (unrolled layers, re-laid weights) lives in inference/decode_layout.py and runs these
same modules.
Positions (`position_embedding`, models/positions.py): RoPE rotates q and k here; the learned
and sinusoidal tables are added in `embed_inputs`; ALiBi's slopes bias the attention scores;
"none" (NoPE) adds nothing. Each reads the batch's `positions_BT`, so packing and the KV cache
work the same for all.
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

from models import moe, pipeline
from models.attention import cached_attention, dot_product_attention
from models.config import ModelConfig
from models.positions import alibi_slopes, sinusoidal_embedding
from models.projection import F32, Einsum, Embedding, dropout
from models.sharding import constrain


# --------------------------------------------------------------------------------------------
# Layers


def _normal(rngs: nnx.Rngs, shape, std, dtype):
    return jax.random.normal(rngs.params(), shape, F32).astype(dtype) * jnp.asarray(std, dtype)


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
    interpolates smoothly between; "yarn" divides by the factor the dims that turn fewer than
    beta_slow times over original_len, keeps those that turn more than beta_fast times, with a
    linear ramp over the dims between (YaRN, arXiv 2309.00071; its attention factor is
    `rope_attention_factor`); "dynamic" gives the plain frequencies, which it uses up to
    original_len (beyond, `rope_inverse_frequencies`). A tuple of floats: static, hashable,
    traced as a constant."""
    h = cfg.head_dim
    f32 = np.float32
    # the power correctly rounded to float32 (as PyTorch's, nearly always), the rest in float32
    exponent = np.arange(0, h, 2).astype(f32) / f32(h)
    inv = f32(1.0) / (float(cfg.rope_theta) ** exponent.astype(np.float64)).astype(f32)
    factor = f32(cfg.rope_scaling_factor)
    old_len = cfg.rope_original_max_seq_len or cfg.max_seq_len
    if cfg.rope_scaling == "linear":
        inv = inv / factor
    elif cfg.rope_scaling == "llama3":
        old_len = f32(old_len)
        low, high = f32(cfg.rope_low_freq_factor), f32(cfg.rope_high_freq_factor)
        # PyTorch evaluates scalar / tensor as tensor.reciprocal() * scalar: so do we, to the last bit
        wavelen = (f32(1) / inv) * f32(2 * math.pi)
        scaled = np.where(wavelen > old_len / low, inv / factor, inv)
        smooth = ((f32(1) / wavelen) * old_len - low) / (high - low)
        smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv = np.where(medium, smoothed, scaled)
    elif cfg.rope_scaling == "yarn":
        base_pow = (float(cfg.rope_theta) ** exponent.astype(np.float64)).astype(f32)  # theta^(2i/H) = 1 / inv

        def dim_of(rotations):  # the dim that turns `rotations` times over old_len (float64, as Python does)
            return h * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, h - 1)
        if low == high:
            high += 0.001  # transformers' guard against a zero-width ramp
        ramp = np.clip((np.arange(h // 2, dtype=f32) - f32(low)) / f32(high - low), f32(0), f32(1))
        keep = f32(1) - ramp  # weight of the unscaled (extrapolated) frequency
        inv = (f32(1) / (factor * base_pow)) * (f32(1) - keep) + inv * keep
    return tuple(float(x) for x in inv.astype(f32))


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What RoPE's cos and sin are multiplied by (so attention logits by its square): YaRN's
    `rope_attention_factor`, or when that is 0, 0.1 ln(factor) + 1 (1 for factor <= 1), or with
    both `rope_mscale` and `rope_mscale_all_dim` set, mscale(factor, mscale) / mscale(factor,
    mscale_all_dim) (transformers' choice, DeepSeek's configs); 1.0 for every other kind."""
    if cfg.rope_scaling != "yarn":
        return 1.0
    if cfg.rope_attention_factor:
        return float(cfg.rope_attention_factor)

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor = cfg.rope_scaling_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return float(mscale(factor, cfg.rope_mscale) / mscale(factor, cfg.rope_mscale_all_dim))
    return mscale(factor)


def rope_inverse_frequencies(cfg: ModelConfig, positions_BT) -> jax.Array:
    """The inverse frequencies [head_dim / 2] (float32) that a call at `positions_BT` uses.

    `rope_frequencies(cfg)` for every kind but "dynamic" (dynamic NTK), whose frequencies depend
    on the call: with L = max(positions_BT) + 1 (over the whole batch), L <= original_len gives the
    plain frequencies, and beyond, the base grows to theta (factor L / original_len - factor +
    1)^(H / (H - 2)), in float32 as transformers computes it (the powers to within a few float32
    ulps of PyTorch's). This is what a fresh transformers rotary module computes in one forward,
    and what its stateful module computes for a sequence that grows call by call (prefill, then
    decoding): with a KV cache, keys are cached after RoPE, each with the frequencies of the call
    that wrote it, as transformers caches them. (transformers' module keeps the largest length it
    has seen until a call falls back below original_len; Loom has no such state: each call uses
    its own positions, per micro-batch when a step splits its batch.)"""
    inv_freq = jnp.asarray(rope_frequencies(cfg), F32)
    if cfg.rope_scaling != "dynamic":
        return inv_freq
    h, factor = cfg.head_dim, cfg.rope_scaling_factor
    original = cfg.rope_original_max_seq_len or cfg.max_seq_len
    seq_len = jnp.max(positions_BT) + 1
    length = jnp.maximum(seq_len, original).astype(F32)
    growth = jnp.float32(factor) * length / jnp.float32(original) - jnp.float32(factor - 1)
    base = jnp.float32(cfg.rope_theta) * growth ** jnp.float32(h / (h - 2))
    grown = 1.0 / base ** (jnp.arange(0, h, 2, dtype=F32) / jnp.float32(h))
    return jnp.where(seq_len > original, grown, inv_freq)


def rope(x_BTNH, positions_BT, theta: float = 10000.0, *, inv_freq=None, attention_factor: float = 1.0):
    """Rotary embedding, Hugging Face's rotate-half layout (first half / second half of head_dim).

    `inv_freq` (head_dim / 2 values, e.g. `rope_inverse_frequencies(cfg, positions_BT)`)
    overrides the plain 1 / theta^(2i/H) frequencies; cos and sin are multiplied by
    `attention_factor` (YaRN's, `rope_attention_factor(cfg)`)."""
    h = x_BTNH.shape[-1]
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=F32) / h))
    else:
        inv_freq = jnp.asarray(inv_freq, F32)
    angle_BTh = positions_BT.astype(F32)[..., None] * inv_freq
    sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
    if attention_factor != 1.0:
        sin, cos = sin * jnp.float32(attention_factor), cos * jnp.float32(attention_factor)
    x1, x2 = jnp.split(x_BTNH.astype(F32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)


def _activation(name):
    return {"silu": jax.nn.silu, "relu": jax.nn.relu, "gelu": lambda x: jax.nn.gelu(x, approximate=False),
            "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}[name]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer for `max_len` slots, filled left to right.

    Heads-first, [L, B, K, S, H]: each (row, kv head) reads its keys as one contiguous [S, H]
    block, so attention over the cache needs no transpose (with [L, B, S, K, H] the transposes
    cost a third of a CPU decode step; benchmarks/RESULTS.md). The layer scan carries the cache
    and each layer writes its new keys and values in place. `segment_ids` is 0 for slots not
    written yet (and for padding tokens), so they are masked; `positions` holds each written
    token's position (RoPE and causal/window masks use them).

    Multi-head latent attention (models/mla.py) caches its latent instead: `k` holds the
    compressed c_kv [L, B, S, kv_lora_rank] and `v` the shared rotated key k_pe [L, B, S,
    qk_rope_head_dim]; everything else (slots, masks, the layer scan, the decode layout) is the same.
    """

    k: jax.Array  # [L, B, K, S, H]; latent attention: c_kv [L, B, S, kv_lora_rank]
    v: jax.Array  # [L, B, K, S, H]; latent attention: k_pe [L, B, S, qk_rope_head_dim]
    segment_ids: jax.Array  # [B, S] int32
    positions: jax.Array  # [B, S] int32
    index: jax.Array  # [] int32: the next slot to write

    @property
    def max_len(self) -> int:
        return self.segment_ids.shape[1]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache of `max_len` slots (in the compute dtype unless `dtype` is given)."""
    dtype = dtype or cfg.compute_dtype
    if cfg.mla.enabled:  # the latent: c_kv and the shared k_pe (models/mla.py)
        k_shape = (cfg.num_layers, batch, max_len, cfg.mla.kv_lora_rank)
        v_shape = (cfg.num_layers, batch, max_len, cfg.mla.qk_rope_head_dim)
    else:
        k_shape = v_shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
    return KVCache(k=jnp.zeros(k_shape, dtype), v=jnp.zeros(v_shape, dtype),
                   segment_ids=jnp.zeros((batch, max_len), jnp.int32),
                   positions=jnp.zeros((batch, max_len), jnp.int32), index=jnp.zeros((), jnp.int32))


def cache_inputs(cache, inputs_BT, positions_BT=None, segment_ids_BT=None) -> dict[str, Any]:
    """What attention needs to add T new tokens to a cache (a `KVCache`, or any object with its
    `segment_ids`, `positions` and `index`): the tokens' positions (default index..index+T-1) and
    segment ids (default 1), the slot they go to, and every slot's positions and segment ids
    with theirs written in."""
    b, t = inputs_BT.shape
    positions_BT, segment_ids_BT = default_positions_and_segments(b, t, positions_BT, segment_ids_BT,
                                                                  start=cache.index)
    at = (0, cache.index)
    return dict(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, cache_index=cache.index,
                kv_positions_BS=jax.lax.dynamic_update_slice(cache.positions, positions_BT, at),
                kv_segment_ids_BS=jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids_BT, at))


def default_positions_and_segments(b: int, t: int, positions_BT=None, segment_ids_BT=None, *, start=0):
    """Positions start..start+T-1 and one segment (id 1) per row, where not given."""
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((b, t), jnp.int32)
    return positions_BT, segment_ids_BT


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
        self.rope_config = cfg if cfg.position_embedding == "rope" else None  # static: frequencies at trace time
        # ALiBi's per-head slopes (static floats; a bias on the scores, models/positions.py)
        self.alibi = alibi_slopes(n) if cfg.position_embedding == "alibi" else None
        self.softcap = cfg.attn_logit_softcap or None
        self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
        self.impl = cfg.attention_impl

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, window, kv_cache=None, cache_index=None,
                 kv_positions_BS=None, kv_segment_ids_BS=None, dropout_rng=None):
        """(out_BTD, new kv_cache or None).

        `dropout_rng` (training) gives each projection a key of its own (LoRA's input dropout).

        `kv_cache` is None (the T tokens attend among themselves), or `(k, v, layer)`: the
        stacked [L, B, K, S, H] buffers and this layer's index, or one layer's own [B, K, S, H]
        buffers and `layer=None`. The new keys and values are written in place at
        `cache_index` (the buffers are a loop carry, never copied) and the queries attend to
        every slot, masked by `kv_positions_BS` / `kv_segment_ids_BS` (see `cache_inputs`).
        """
        rq, rk, rv, ro = projection_keys(dropout_rng, 4)
        q_BTNH = constrain(self.q(x_BTD, rng=rq), ("batch", "length", "heads", "head_dim"))
        k_BTKH = constrain(self.k(x_BTD, rng=rk), ("batch", "length", "kv_heads", "head_dim"))
        v_BTKH = constrain(self.v(x_BTD, rng=rv), ("batch", "length", "kv_heads", "head_dim"))
        if self.q_norm is not None:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if self.rope_config is not None:
            # keys are cached after RoPE, with this call's frequencies (rope_inverse_frequencies)
            inv_freq = rope_inverse_frequencies(self.rope_config, positions_BT)
            scale = rope_attention_factor(self.rope_config)
            q_BTNH = rope(q_BTNH, positions_BT, inv_freq=inv_freq, attention_factor=scale)
            k_BTKH = rope(k_BTKH, positions_BT, inv_freq=inv_freq, attention_factor=scale)
        out_BTNH, _, new_cache = self.attend(
            q_BTNH, k_BTKH, v_BTKH, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, window=window,
            kv_cache=kv_cache, cache_index=cache_index, kv_positions_BS=kv_positions_BS,
            kv_segment_ids_BS=kv_segment_ids_BS)
        out_BTNH = checkpoint_name(constrain(out_BTNH, ("batch", "length", "heads", "head_dim")), "attention")
        return self.o(out_BTNH, rng=ro), new_cache

    def attend(self, q_BTNH, k_BTKH, v_BTKH, *, positions_BT, segment_ids_BT, window, kv_cache=None,
               cache_index=None, kv_positions_BS=None, kv_segment_ids_BS=None, return_lse=False):
        """(out_BTNH, lse_BNT or None, new kv_cache or None): the queries (after RoPE) against this
        call's keys, or against the cache with this call's keys and values written in (see
        `__call__`). A substituted attention (models/prefix.py) adds keys of its own here, merging
        its part with this one by the log-sum-exp `return_lse=True` gives."""
        dt = q_BTNH.dtype
        slopes = None if self.alibi is None else jnp.asarray(self.alibi, F32)
        if kv_cache is None:
            out = dot_product_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids=segment_ids_BT, positions=positions_BT,
                                        causal=True, window=window, softcap=self.softcap, scale=self.scale,
                                        impl=self.impl, return_lse=return_lse, alibi_slopes=slopes)
            new_cache = None
        else:
            k_buf, v_buf, layer = kv_cache
            new_k, new_v = k_BTKH.transpose(0, 2, 1, 3), v_BTKH.transpose(0, 2, 1, 3)  # [B, K, T, H]
            at = (0, 0, cache_index, 0)
            if layer is not None:
                new_k, new_v, at = new_k[None], new_v[None], (layer, *at)
            k_buf = jax.lax.dynamic_update_slice(k_buf, new_k.astype(k_buf.dtype), at)
            v_buf = jax.lax.dynamic_update_slice(v_buf, new_v.astype(v_buf.dtype), at)
            k_BKSH, v_BKSH = (k_buf, v_buf) if layer is None else (k_buf[layer], v_buf[layer])
            out = cached_attention(q_BTNH, k_BKSH.astype(dt), v_BKSH.astype(dt),
                                   segment_ids=(segment_ids_BT, kv_segment_ids_BS),
                                   positions=(positions_BT, kv_positions_BS), window=window,
                                   softcap=self.softcap, scale=self.scale, impl=self.impl, return_lse=return_lse,
                                   alibi_slopes=slopes)
            new_cache = (k_buf, v_buf)
        out_BTNH, lse_BNT = out if return_lse else (out, None)
        return out_BTNH, lse_BNT, new_cache


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

    def __call__(self, x_BTD, *, dropout_rng=None):
        act = _activation(self.act)
        rg, ru, rd = projection_keys(dropout_rng, 3)
        if self.gate is None:
            h_BTF = act(self.up(x_BTD, rng=ru))
        else:
            h_BTF = act(self.gate(x_BTD, rng=rg)) * self.up(x_BTD, rng=ru)
        h_BTF = constrain(h_BTF, ("batch", "length", "mlp"))
        return self.down(h_BTF, rng=rd)


def attention_layer(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """The config's attention: grouped-query `Attention`, or multi-head latent attention
    (models/mla.py, which builds on this module) when `cfg.mla` is on."""
    if cfg.mla.enabled:
        from models.mla import MlaAttention

        return MlaAttention(cfg, rngs=rngs)
    return Attention(cfg, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm residual block: x + Attn(Norm(x)), then x + Mlp(Norm(x)).

    With `post_norms` (Gemma 2) each branch's output is normalised again before the add:
    x + Norm(Attn(Norm(x))), then x + Norm(Mlp(Norm(x))). With `is_moe` the feed-forward
    block is a mixture of experts (models/moe.py `MoeMlp`, the same call).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, is_moe: bool = False):
        norm = functools.partial(Norm, cfg.hidden_size, cfg.norm, cfg.norm_eps, cfg.params_dtype,
                                 offset=cfg.norm_weight_offset)
        self.attn_norm = norm()
        self.attn = attention_layer(cfg, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = moe.MoeMlp(cfg, rngs=rngs) if is_moe else Mlp(cfg, rngs=rngs)
        self.attn_post_norm = self.mlp_post_norm = nnx.data(None)
        if cfg.post_norms:
            self.attn_post_norm, self.mlp_post_norm = norm(), norm()
        self.dropout_rate = cfg.dropout_rate

    def __call__(self, x_BTD, *, dropout_rng=None, **attn_kw):
        """(x_BTD, the attention's new kv_cache); `attn_kw` go to `Attention.__call__`."""
        rng_attn = rng_mlp = None
        if dropout_rng is not None:
            rng_attn, rng_mlp = jax.random.split(dropout_rng)
        rng_attn_proj, rng_mlp_proj = projection_keys(dropout_rng, 2, salt=1)
        a_BTD, new_cache = self.attn(self.attn_norm(x_BTD), dropout_rng=rng_attn_proj, **attn_kw)
        if self.attn_post_norm is not None:
            a_BTD = self.attn_post_norm(a_BTD)
        x_BTD = x_BTD + dropout(a_BTD, self.dropout_rate, rng_attn)
        m_BTD = self.mlp(self.mlp_norm(x_BTD), dropout_rng=rng_mlp_proj)
        if self.mlp_post_norm is not None:
            m_BTD = self.mlp_post_norm(m_BTD)
        x_BTD = x_BTD + dropout(m_BTD, self.dropout_rate, rng_mlp)
        return constrain(x_BTD, ("batch", "length", None)), new_cache


def projection_keys(rng, n: int, *, salt: int = 0):
    """n dropout keys for a module's projections from its key (all None without one); keys of
    their own, apart from the residual dropout's split of the same key."""
    if rng is None:
        return (None,) * n
    base = jax.random.fold_in(rng, 1_000_003 + salt)
    return tuple(jax.random.fold_in(base, i) for i in range(n))


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # keep the projections' and attention's outputs; recompute norms, activations, residual adds
    "save_dots": jax.checkpoint_policies.save_only_these_names("proj", "attention"),
}


def soft_cap(x, cap):
    """cap * tanh(x / cap); the identity for cap 0 / None."""
    return cap * jnp.tanh(x / cap) if cap else x


# --------------------------------------------------------------------------------------------
# The decoder


def layer_stacks(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The decoder's stacks of layers: attribute -> the global indices of its layers, in order
    (row r of the stack is layer indices[r]). `layers` holds every layer of a dense model; with
    MoE, `layers` the MoE layers and `dense_layers` the dense-MLP ones (absent when none)."""
    dense = tuple(i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i))
    if not cfg.moe.enabled:
        return {"layers": dense}
    out = {"dense_layers": dense} if dense else {}
    return {**out, "layers": tuple(i for i in range(cfg.num_layers) if cfg.is_moe_layer(i))}


def layer_groups(cfg: ModelConfig) -> tuple[tuple[str, int, int, int], ...]:
    """The runs of consecutive layers of one kind, in order, as (attribute, first layer, end,
    first row): global layers first..end-1 are rows first_row..first_row + end - first - 1 of the
    stack `attribute` (`layer_stacks`). A dense model is one run of `layers`; an MoE model with a
    dense prefix two; dense layers between MoE ones (Qwen-MoE's mlp_only_layers) more. The KV
    cache and per-layer windows use global indices."""
    runs: list[tuple[str, int, int, int]] = []
    rows = {"layers": 0, "dense_layers": 0}
    for i in range(cfg.num_layers):
        name = "layers" if cfg.is_moe_layer(i) or not cfg.moe.enabled else "dense_layers"
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], i + 1, runs[-1][3])
        else:
            runs.append((name, i, i + 1, rows[name]))
        rows[name] += 1
    return tuple(runs)


class Decoder(nnx.Module):
    """Embedding, L stacked blocks, final norm, output head (its own, or the tied embedding).

    A model with MoE layers stacks them apart from its dense-MLP layers (`layer_stacks`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt = cfg.params_dtype
        self.embed = Embedding(_normal(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.init_std, pdt),
                               axes=("vocab", "embed"))
        self.pos_embed = nnx.data(None)
        if cfg.position_embedding == "learned":
            self.pos_embed = nnx.Param(_normal(rngs, (cfg.max_seq_len, cfg.hidden_size), cfg.init_std / 2, pdt),
                                       axes=(None, "embed"))
        self.dense_layers = nnx.data(None)
        for name, layers in layer_stacks(cfg).items():
            setattr(self, name, _stacked_blocks(cfg, rngs, len(layers), is_moe=cfg.is_moe_layer(layers[0])))
        self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, pdt, offset=cfg.norm_weight_offset)
        self.lm_head = nnx.data(None)
        if not cfg.tie_embeddings:
            self.lm_head = Einsum("BTD,DV->BTV", (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  std=cfg.init_std, dtype=cfg.compute_dtype, param_dtype=pdt, rngs=rngs,
                                  out_dtype=F32)

    def embed_inputs(self, inputs_BT, positions_BT):
        """Token ids [B, T] -> the first residual stream [B, T, D] in the compute dtype, plus the
        learned or sinusoidal position rows (models/positions.py) of `positions_BT`."""
        cfg = self.config
        dt = cfg.compute_dtype
        x_BTD = self.embed.rows(inputs_BT, dt)
        if cfg.embed_scale != 1.0:
            x_BTD = x_BTD * jnp.asarray(cfg.embed_scale, dt)  # rounded to the compute dtype, as Gemma does
        if self.pos_embed is not None:
            x_BTD = x_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(dt)
        elif cfg.position_embedding == "sinusoidal":
            x_BTD = x_BTD + sinusoidal_embedding(positions_BT, cfg.hidden_size).astype(dt)
        return constrain(x_BTD, ("batch", "length", None))

    def output_logits(self, x_BTD):
        """The last residual stream [B, T, D] -> logits [B, T, V] in float32 (final norm, head, soft-cap)."""
        cfg = self.config
        x_BTD = self.final_norm(x_BTD)
        if self.lm_head is not None:
            logits_BTV = self.lm_head(x_BTD)
        else:
            logits_BTV = self.embed.einsum("BTD,VD->BTV", x_BTD, cfg.compute_dtype, F32)
        return constrain(soft_cap(logits_BTV, cfg.logit_softcap), ("batch", "length", "vocab"))

    def __call__(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None,
                 dropout_rng=None):
        """Logits [B, T, V] in float32, or (logits, updated cache) when `cache` is given.

        Without a cache, positions default to 0..T-1 and segment ids to one document per row.
        With a cache, the T new tokens are written at `cache.index`; positions default to
        index..index+T-1 and segment ids to 1 (left-padded prompts pass 0 for the padding).
        `dropout_rng` turns dropout on (training); None is deterministic.
        """
        logits_BTV, new_cache, _ = self.forward(inputs_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                                cache=cache, dropout_rng=dropout_rng, aux=False)
        return logits_BTV if cache is None else (logits_BTV, new_cache)

    def forward_with_aux(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, dropout_rng=None):
        """(logits [B, T, V] float32, aux): the call without a cache, plus the auxiliary outputs
        the loss needs: {} for a dense model; with MoE layers `models.moe.summarize`'s dict
        (`aux_loss`, the term to add to the loss, and the routing metrics)."""
        logits_BTV, _, aux = self.forward(inputs_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                          dropout_rng=dropout_rng, aux=True)
        return logits_BTV, aux

    def forward(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, cache: KVCache | None = None,
                dropout_rng=None, aux: bool = False):
        """(logits, new cache or None, aux dict): `__call__` and `forward_with_aux` in one."""
        cfg = self.config
        b, t = inputs_BT.shape
        if cache is None:
            attn_kw = dict(zip(("positions_BT", "segment_ids_BT"),
                               default_positions_and_segments(b, t, positions_BT, segment_ids_BT)))
        else:
            attn_kw = cache_inputs(cache, inputs_BT, positions_BT, segment_ids_BT)
        x_BTD = self.embed_inputs(inputs_BT, attn_kw["positions_BT"])
        if dropout_rng is not None:
            dropout_rng, embed_rng = jax.random.split(dropout_rng)
            x_BTD = dropout(x_BTD, cfg.dropout_rate, embed_rng)
        x_BTD, kv, stats = self.run_layers(x_BTD, attn_kw, kv=None if cache is None else (cache.k, cache.v),
                                           dropout_rng=dropout_rng, collect=aux)
        logits_BTV = self.output_logits(x_BTD)
        extra = {}
        if aux and stats is not None:
            extra = moe.summarize(cfg.moe, stats)
        if cache is None:
            return logits_BTV, None, extra
        return logits_BTV, KVCache(k=kv[0], v=kv[1], segment_ids=attn_kw["kv_segment_ids_BS"],
                                   positions=attn_kw["kv_positions_BS"], index=cache.index + t), extra

    def run_layers(self, x_BTD, attn_kw: dict[str, Any], *, kv=None, dropout_rng=None, collect: bool = False):
        """The L blocks over x [B, T, D]: (x, kv, stats) with kv the updated (k, v) cache buffers
        or None, and stats the MoE layers' routing statistics stacked over those layers
        (`collect=True` and a model with MoE layers; else None).

        A `jax.lax.scan` over each run of layers (`layer_groups`; the cache buffers, when
        given, ride in the carry), rematerialised per `remat`; or, with `pipeline_stages > 1`, a
        GPipe pipeline over the mesh's `stage` axis (models/pipeline.py). One window for every
        layer is a static int; different windows per layer (Gemma 2's local/global alternation)
        are an int array scanned with the layers.
        """
        cfg = self.config
        if len(set(cfg.layer_windows)) > 1:
            attn_kw = {**attn_kw, "window": None}
            windows_L = jnp.asarray(cfg.layer_windows, jnp.int32)
        else:
            attn_kw = {**attn_kw, "window": cfg.window(0) or None}
            windows_L = None

        def layer_fn(graphdef):
            def layer(x_BTD, *, state, index, window, kv, batch_kw, rng):
                """Block `index` of the stack `graphdef` (parameters `state`); `window` overrides
                the static one when per layer; `batch_kw` the positions / segment ids (a pipeline
                micro-batch's own). Returns ((x, kv), the block's MoE statistics or None)."""
                kw = {**attn_kw, **batch_kw}
                if window is not None:
                    kw["window"] = window
                if kv is not None:
                    kw["kv_cache"] = (*kv, index)
                rng = None if rng is None else jax.random.fold_in(rng, index)
                block = nnx.merge(graphdef, state)
                if not collect:
                    return block(x_BTD, dropout_rng=rng, **kw), None
                with moe.collect_stats() as found:
                    out = block(x_BTD, dropout_rng=rng, **kw)
                return out, (found[0] if found else None)

            if cfg.remat != "none":
                return jax.checkpoint(layer, policy=_REMAT[cfg.remat], prevent_cse=False)
            return layer

        if cfg.pipeline_stages > 1:
            if kv is not None:
                raise ValueError(f"KV-cache decoding is not supported with model.pipeline_stages="
                                 f"{cfg.pipeline_stages}: decode with a model built from "
                                 f"cfg.replace(pipeline_stages=1) (the parameters are the same)")
            graphdef, layer_state = nnx.split(self.layers)
            layer = layer_fn(graphdef)

            def stage_layer(x_BTD, layer_xs, batch_kw, microbatch):
                state, index, window = layer_xs
                # dropout: a key per (micro-batch, layer); masks differ from the unpipelined model's
                rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, microbatch)
                return layer(x_BTD, state=state, index=index, window=window, kv=None, batch_kw=batch_kw, rng=rng)[0][0]

            batch_kw = {k: attn_kw[k] for k in ("positions_BT", "segment_ids_BT")}
            x_BTD = pipeline.gpipe(stage_layer, x_BTD, (layer_state, jnp.arange(cfg.num_layers), windows_L), batch_kw,
                                   stages=cfg.pipeline_stages,
                                   microbatches=pipeline.num_microbatches(cfg.pipeline_stages,
                                                                          cfg.pipeline_microbatches))
            return x_BTD, None, None

        stats = []
        for name, start, end, row in layer_groups(cfg):
            graphdef, layer_state = nnx.split(getattr(self, name))
            if end - start != len(layer_stacks(cfg)[name]):  # a run of part of the stack: its rows
                layer_state = jax.tree.map(lambda a, row=row, n=end - start: a[row:row + n], layer_state)
            layer = layer_fn(graphdef)

            def scan_body(carry, layer_xs, layer=layer):
                x_BTD, kv = carry
                state, index, window = layer_xs
                (x_BTD, kv), found = layer(x_BTD, state=state, index=index, window=window, kv=kv, batch_kw={},
                                           rng=dropout_rng)
                return (x_BTD, kv), found

            xs = (layer_state, jnp.arange(start, end), None if windows_L is None else windows_L[start:end])
            (x_BTD, kv), found = jax.lax.scan(scan_body, (x_BTD, kv), xs)
            if found is not None:
                stats.append(found)  # an MoE run's, [layers of the run, ...]
        if not stats:
            return x_BTD, kv, None
        # per MoE layer in order (the rows of the `layers` stack)
        return x_BTD, kv, stats[0] if len(stats) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *stats)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, num_layers: int, *, is_moe: bool = False) -> Block:
    """`num_layers` Blocks (MoE ones with `is_moe`) as one whose every parameter has a leading
    `layers` axis (one slice per layer)."""
    keys = jax.random.split(rngs.params(), num_layers)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, rngs=nnx.Rngs(0), is_moe=is_moe)))
    state = jax.vmap(lambda key: nnx.state(Block(cfg, rngs=nnx.Rngs(params=key), is_moe=is_moe)))(keys)
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
    """Logits [B, T, V] float32 for a batch dict (`inputs_BT`, optional positions/segment ids).
    `params` is one state, or a tuple of the states a multi-way `nnx.split` gave (e.g. the
    trained adapters and the frozen base)."""
    model = nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    return model(batch["inputs_BT"], positions_BT=batch.get("positions_BT"),
                 segment_ids_BT=batch.get("segment_ids_BT"), dropout_rng=dropout_rng)


def apply_with_aux(graphdef, params, batch: dict, *, dropout_rng=None):
    """(logits [B, T, V] float32, aux) for a batch dict, as `apply`; aux is the model's auxiliary
    outputs (`Decoder.forward_with_aux`: {} for a dense model, MoE's losses and statistics)."""
    model = nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    return model.forward_with_aux(batch["inputs_BT"], positions_BT=batch.get("positions_BT"),
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
