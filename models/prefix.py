"""Prefix tuning (Li & Liang, 2021) / P-tuning v2 (Liu et al., 2022): trained key/value prefixes
in every layer's attention, the base frozen.

Each layer gets P virtual keys and values [P, K, H] (per kv head, as the cache holds them) that
every query attends to besides the sequence's own keys:

    out = softmax([q k_prefix^T, q k^T] * scale) [v_prefix; v]

computed as two attentions merged by their log-sum-exps: the base's attention over the real keys
(any impl: blockwise XLA, Pallas flash, ring attention, the KV cache while decoding; it returns
its lse) and a small one over the P prefix keys. So prefixes need no change to the masks, the
cache or packing: a packed row's segments each see the prefixes, and `inference.generate`
decodes with them as it is.

Position convention: prefix keys carry no RoPE (they are trained in the rotated space directly)
and the real tokens keep their positions 0..T-1. PEFT gives the real tokens positions P..P+T-1
and uses the prefix keys as they are; the real tokens' scores among themselves depend only on
position differences, and a prefix key k scores against a query at P + t as R_P k does against
one at t, so the PEFT export (models/hf/peft_io.py) writes R_P k (`peft_compatible` says when
this holds: RoPE without dynamic NTK, no sliding window). Under ALiBi the prefix keys get no
bias (keys at distance 0).

Optionally (`reparam` > 0) the prefixes are the output of a per-layer MLP, embedding [P, D] ->
tanh(W1) [R] -> W2 [2 K H], which Li & Liang found trains more stably than the raw prefixes;
`prefixes()` evaluates it, and `fold_prefixes` replaces it by its output once training is done.

    model = apply_prefix(model, length=16, reparam=0)
    trainable = nnx.state(model, PrefixParam)        # the prefixes only
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from models.projection import F32
from models.transformer import Attention, Decoder, soft_cap


class PrefixParam(nnx.Param):
    """A prefix-tuning weight: what a prefix run trains (`nnx.state(model, PrefixParam)`)."""


class PrefixAttention(Attention):
    """The base's `Attention` (the same projections, norms and settings, so projection paths,
    LoRA targets and exports see the same model) plus trained key/value prefixes."""

    def __init__(self, base: Attention, *, key: jax.Array, num_layers: int | None, num_kv_heads: int, head_dim: int,
                 hidden_size: int, length: int, reparam: int, std: float, param_dtype):
        """`base`'s projections and settings plus new prefixes; `num_layers` is the leading axis
        of a stacked model's layers (None: one layer's module)."""
        for name, value in vars(base).items():
            if not name.startswith("_"):
                setattr(self, name, value)
        lead = () if num_layers is None else (num_layers,)
        layer_axis = () if num_layers is None else ("layers",)
        shape = lead + (length, num_kv_heads, head_dim)
        axes = layer_axis + (None, "kv_heads", "head_dim")
        k_emb, k_w1, k_w2, k_k, k_v = jax.random.split(key, 5)

        def normal(k, shape_, scale):
            return (jax.random.normal(k, shape_, F32) * scale).astype(param_dtype)

        self.length, self.reparam, self.num_kv_heads = int(length), int(reparam), int(num_kv_heads)
        self.prefix_k = self.prefix_v = nnx.data(None)
        self.embedding = self.w1 = self.b1 = self.w2 = self.b2 = nnx.data(None)
        if self.reparam:
            r, out = self.reparam, 2 * num_kv_heads * head_dim
            self.embedding = PrefixParam(normal(k_emb, lead + (length, hidden_size), 1.0),
                                         axes=layer_axis + (None, "embed"))
            self.w1 = PrefixParam(normal(k_w1, lead + (hidden_size, r), 1 / math.sqrt(hidden_size)),
                                  axes=layer_axis + ("embed", None))
            self.b1 = PrefixParam(jnp.zeros(lead + (r,), param_dtype), axes=layer_axis + (None,))
            # outputs of the order of `std`, as the plain prefixes start
            self.w2 = PrefixParam(normal(k_w2, lead + (r, out), std / math.sqrt(r)), axes=layer_axis + (None, None))
            self.b2 = PrefixParam(jnp.zeros(lead + (out,), param_dtype), axes=layer_axis + (None,))
        else:
            self.prefix_k = PrefixParam(normal(k_k, shape, std), axes=axes)
            self.prefix_v = PrefixParam(normal(k_v, shape, std), axes=axes)

    def prefixes(self):
        """(keys, values), each [..., P, K, H] float32 (a leading layer axis when stacked)."""
        if self.prefix_k is not None:
            return self.prefix_k[...].astype(F32), self.prefix_v[...].astype(F32)
        e = self.embedding[...].astype(F32)
        hdn = jnp.tanh(jnp.einsum("...PD,...DR->...PR", e, self.w1[...].astype(F32))
                       + self.b1[...].astype(F32)[..., None, :])
        kv = jnp.einsum("...PR,...RO->...PO", hdn, self.w2[...].astype(F32)) + self.b2[...].astype(F32)[..., None, :]
        k, v = jnp.split(kv, 2, axis=-1)
        heads_shape = k.shape[:-1] + (self.num_kv_heads, -1)
        return k.reshape(heads_shape), v.reshape(heads_shape)

    def attend(self, q_BTNH, k_BTKH, v_BTKH, *, return_lse=False, **kw):
        out_BTNH, lse_BNT, new_cache = super().attend(q_BTNH, k_BTKH, v_BTKH, return_lse=True, **kw)
        pk_PKH, pv_PKH = self.prefixes()
        b, t, n, h = q_BTNH.shape
        kh = pk_PKH.shape[-2]
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(h)
        q = q_BTNH.astype(F32).reshape(b, t, kh, n // kh, h)
        s_BKGTP = soft_cap(jnp.einsum("BTKGH,PKH->BKGTP", q, pk_PKH) * scale, self.softcap)
        lse_p_BKGT = jax.nn.logsumexp(s_BKGTP, axis=-1)
        p = jnp.exp(s_BKGTP - lse_p_BKGT[..., None])
        out_p_BTNH = jnp.einsum("BKGTP,PKH->BTKGH", p, pv_PKH).reshape(b, t, n, h)
        lse_p_BNT = lse_p_BKGT.reshape(b, n, t)
        # merge the two softmaxes with weights exp(lse_i - lse); a query whose own keys are all
        # masked (lse about -3.4e38) attends to the prefix alone
        lse_all = jnp.logaddexp(lse_BNT, lse_p_BNT)
        w_own = jnp.exp(lse_BNT - lse_all).transpose(0, 2, 1)[..., None]  # [B, T, N, 1]
        w_pre = jnp.exp(lse_p_BNT - lse_all).transpose(0, 2, 1)[..., None]
        out = (w_own * out_BTNH.astype(F32) + w_pre * out_p_BTNH).astype(q_BTNH.dtype)
        return out, (lse_all if return_lse else None), new_cache


def apply_prefix(model: Decoder, *, length: int, reparam: int = 0, seed: int = 0, std: float | None = None,
                 param_dtype=None) -> Decoder:
    """A copy of `model` whose attention layers carry `length` trained key/value prefixes each
    (see the module docstring); `reparam` > 0 produces them from a per-layer MLP of that width.
    Prefixes start as N(0, std) (default: the config's init_std), stored in `param_dtype`
    (default: the model's parameter dtype)."""
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"prefix length={length!r} is not valid; expected an integer >= 1")
    if isinstance(reparam, bool) or not isinstance(reparam, int) or reparam < 0:
        raise ValueError(f"prefix reparam={reparam!r} is not valid; expected 0 (no MLP) or the MLP's width >= 1")
    if not isinstance(model, Decoder):
        raise TypeError(f"apply_prefix takes a models.transformer.Decoder, not {type(model).__name__}")
    if isinstance(model.layers.attn, PrefixAttention):
        raise ValueError("the model already has prefixes")
    cfg = model.config
    if type(model.layers.attn) is not Attention:
        raise ValueError(f"prefix tuning needs grouped-query attention; this model's layers run "
                         f"{type(model.layers.attn).__name__} (model.mla={cfg.mla}): use LoRA instead")
    model = nnx.clone(model)
    model.layers.attn = PrefixAttention(
        model.layers.attn, key=jax.random.fold_in(jax.random.key(seed), 0x9E37), num_layers=cfg.num_layers,
        num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, hidden_size=cfg.hidden_size, length=length,
        reparam=reparam, std=cfg.init_std if std is None else std, param_dtype=param_dtype or cfg.params_dtype)
    return model


def fold_prefixes(model: Decoder) -> Decoder:
    """A copy of a prefix model whose reparameterisation MLP is replaced by its output (the same
    function, the plain prefixes stored); a model without the MLP is copied as it is."""
    model = nnx.clone(model)
    attn = model.layers.attn
    if not isinstance(attn, PrefixAttention):
        raise ValueError("the model has no prefixes (models.prefix.apply_prefix)")
    if attn.prefix_k is None:
        dt = attn.embedding[...].dtype
        k, v = attn.prefixes()
        axes = ("layers", None, "kv_heads", "head_dim")
        attn.prefix_k, attn.prefix_v = PrefixParam(k.astype(dt), axes=axes), PrefixParam(v.astype(dt), axes=axes)
        attn.embedding = attn.w1 = attn.b1 = attn.w2 = attn.b2 = nnx.data(None)
        attn.reparam = 0
    return model


def peft_compatible(cfg) -> list[str]:
    """Why this model's prefixes would not mean the same under PEFT's convention (real tokens at
    positions P..P+T-1, the prefix as a cache without RoPE); empty when they do."""
    reasons = []
    if cfg.position_embedding != "rope":
        reasons.append(f"position_embedding={cfg.position_embedding!r} (PEFT shifts the real tokens' positions by "
                       "the prefix length; only RoPE's relative scores are unchanged by that)")
    elif cfg.rope_scaling == "dynamic":
        reasons.append("rope_scaling='dynamic' (its frequencies depend on the largest position, which PEFT shifts)")
    if any(cfg.layer_windows):
        reasons.append("a sliding window (PEFT's prefix slots fall out of the window; Loom's never do)")
    return reasons
