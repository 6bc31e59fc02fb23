"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434, section 2.1), with a KV cache
of the latent and decoding in the absorbed form.

Per token x [D] (N heads; dims Hn = qk_nope_head_dim, Hr = qk_rope_head_dim, Hv = v_head_dim,
R = kv_lora_rank, Rq = q_lora_rank):
  queries  q = q_b(RMSNorm(q_a x)) with the low-rank bottleneck (Rq > 0), or q = q x;
           per head [Hn + Hr], split into q_nope [Hn] and q_pe [Hr]
  latent   [c_kv; k_pe] = kv_a x   ([R + Hr], shared by all heads), c_kv <- RMSNorm(c_kv)
  RoPE     on q_pe (each head) and on the one shared k_pe: the decoupled RoPE of the paper
  per head [k_nope; v] = kv_b c_kv ([R, N, Hn + Hv]): k_nope = W_UK c_kv, v = W_UV c_kv
  scores   scale (q_nope . k_nope + q_pe . k_pe), scale = (Hn + Hr)^-1/2, times mscale^2 under
           YaRN with `rope_mscale_all_dim` (DeepSeek's softmax scale; `query_pre_attn_scalar`
           replaces Hn + Hr when set)
  out      o(softmax(scores) v) over the heads' [Hv] outputs.

Training and cache-free calls run this "naive" form: keys and values expanded per head and one
`dot_product_attention` call whose values have their own head dim (any impl that takes it).

With a KV cache, each token stores only c_kv [R] and k_pe [Hr] per layer (`init_cache`: the
cache's `k` holds c_kv [L, B, S, R], its `v` holds k_pe [L, B, S, Hr]), R + Hr numbers instead of
the 2 N H of grouped-query attention with N kv heads. Attention over the cache runs in the
absorbed form (the paper's W_UK absorbed into the query, W_UV into the output): since
q_nope . (W_UK c) = (W_UK^T q_nope) . c, each head's query moves once into the latent space and
is scored against the cached latents themselves, and W_UV maps the weighted sum of latents to
the head's values after the softmax:

    q_lat[n] = W_UK[n]^T q_nope[n]  [R]       s[n, j] = scale (q_lat[n] . c_kv[j] + q_pe[n] . k_pe[j])
    out[n] = W_UV[n] sum_j softmax(s[n])_j c_kv[j]

which is multi-query attention with one shared head (keys [c_kv; k_pe], values c_kv). It costs
2R + Hr multiply-adds per query and key where the expanded form costs Hn + Hr + Hv, but never
expands the S cached latents through kv_b (S R N (Hn + Hv)): for T new queries it is the cheaper
form while T (2R - Hn - Hv) <= R (Hn + Hv), about 170 queries at DeepSeek-V2's sizes. Decode
steps and short chunks run absorbed; a long prompt written into the cache runs the expanded
form over the cache's latents (`cache_form` forces either; both are the same function).

The absorbed form reads kv_b's weight whole (`kernel.dense`, through LoRA / quantized kernels
too); `DENSE_PROJECTIONS` tells the CPU decode layout (inference/decode_layout.py) to leave that
kernel in its own layout.

Conventions: RoPE is Loom's rotate-half over the Hr rope dims with the config's scaling (the
config's `head_dim` is Hr, as in DeepSeek-V2's config.json); DeepSeek rotates interleaved pairs,
which the Hugging Face importer (models/hf/families.py) turns into rotate-half by permuting the
rope rows of the q and kv_a weights. The two latent norms are RMSNorm with eps 1e-6 whatever
`norm_eps` says, as DeepSeek's. Biases (`attention_bias`) sit where DeepSeek puts them: on q_a
and kv_a (not on q, q_b, kv_b); `attention_out_bias` on o.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from models.attention import dot_product_attention
from models.config import ModelConfig
from models.projection import F32, Einsum
from models.sharding import constrain
from models.transformer import Norm, projection_keys, rope, rope_attention_factor, rope_inverse_frequencies
from pallas_kernels.reference import attention_mask, masked_softmax, split_pair

LATENT_NORM_EPS = 1e-6  # DeepSeek's q_a_layernorm / kv_a_layernorm, whatever rms_norm_eps is
CACHE_FORMS = ("auto", "absorbed", "naive")


def softmax_scale(cfg: ModelConfig) -> float:
    """(query_pre_attn_scalar or Hn + Hr)^-1/2, times mscale(factor, mscale_all_dim)^2 under YaRN
    (DeepSeek's softmax scale: YaRN's attention factor already scales the rope dims through cos
    and sin, this one scales all of q . k)."""
    m = cfg.mla
    scale = (cfg.query_pre_attn_scalar or m.qk_head_dim) ** -0.5
    factor = cfg.rope_scaling_factor
    if cfg.rope_scaling == "yarn" and cfg.rope_mscale_all_dim and factor > 1:
        mscale = 0.1 * cfg.rope_mscale_all_dim * math.log(factor) + 1.0
        scale *= mscale * mscale
    return float(scale)


def absorbed_is_cheaper(t: int, cfg: ModelConfig) -> bool:
    """Whether T new queries attend over the cache more cheaply absorbed than expanded (module doc)."""
    m = cfg.mla
    r, hn, hv = m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim
    return t * (2 * r - hn - hv) <= r * (hn + hv)


def absorbed_attention(q_nope_BTNH, q_pe_BTNH, c_BSR, k_pe_BSH, w_uk_RNH, w_uv_RNV, *, segment_ids, positions,
                       window=None, softcap=None, scale: float, return_lse=False):
    """Causal attention of T queries over S cached latents in the absorbed form (module doc).

    Args:
      q_nope_BTNH: the queries' position-free part [B, T, N, Hn].
      q_pe_BTNH: their rotated part [B, T, N, Hr].
      c_BSR, k_pe_BSH: the cached latents [B, S, R] and rotated shared keys [B, S, Hr].
      w_uk_RNH, w_uv_RNV: kv_b's key and value halves, [R, N, Hn] and [R, N, Hv].
      segment_ids, positions: (q_BT, kv_BS) pairs, as `dot_product_attention`'s.
      window, softcap, scale: as `dot_product_attention`'s (scale explicit).
    Returns:
      out [B, T, N, Hv] in q's dtype (and lse [B, N, T] float32 with `return_lse`).
    Scores, softmax and accumulation are float32; on CPU every operand is converted to float32
    first (as `cached_attention` does: XLA:CPU has no bf16 x bf16 -> f32 batched dot).
    """
    q_seg, k_seg = split_pair(segment_ids, "segment_ids")
    q_pos, k_pos = split_pair(positions, "positions")
    if isinstance(window, int) and window <= 0:
        window = None
    acc = jnp.promote_types(q_nope_BTNH.dtype, F32)
    ops = acc if jax.default_backend() == "cpu" else q_nope_BTNH.dtype
    q_nope, q_pe, c, k_pe, w_uk, w_uv = (x.astype(ops) for x in (q_nope_BTNH, q_pe_BTNH, c_BSR, k_pe_BSH,
                                                                w_uk_RNH, w_uv_RNV))
    q_lat_BTNR = jnp.einsum("BTNH,RNH->BTNR", q_nope, w_uk, preferred_element_type=acc).astype(ops)
    s_BNTS = (jnp.einsum("BTNR,BSR->BNTS", q_lat_BTNR, c, preferred_element_type=acc)
              + jnp.einsum("BTNH,BSH->BNTS", q_pe, k_pe, preferred_element_type=acc))
    mask = attention_mask(q_pos, k_pos, q_seg, k_seg, causal=True, window=window)[:, None]
    p_BNTS, lse_BNT = masked_softmax(s_BNTS * scale, mask, softcap)
    o_lat_BTNR = jnp.einsum("BNTS,BSR->BTNR", p_BNTS.astype(ops), c, preferred_element_type=acc).astype(ops)
    out_BTNV = jnp.einsum("BTNR,RNV->BTNV", o_lat_BTNR, w_uv, preferred_element_type=acc).astype(q_nope_BTNH.dtype)
    return (out_BTNV, lse_BNT.astype(F32)) if return_lse else out_BTNV


class MlaAttention(nnx.Module):
    """Multi-head latent attention with `Attention`'s call signature (models/transformer.py), so
    the scanned layers, the pipeline, `generate` and the CPU decode layout run it as they run
    grouped-query attention. Projections (LoRA target names): `q` or `q_a` + `q_b`, `kv_a`,
    `kv_b`, `o`."""

    # read whole (kernel.dense) by the absorbed form: the CPU decode layout keeps their layout
    DENSE_PROJECTIONS = ("kv_b",)

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        if not cfg.mla.enabled:
            raise ValueError(f"MlaAttention needs model.mla.kv_lora_rank > 0; got model.mla={cfg.mla}")
        m = cfg.mla
        d, n = cfg.hidden_size, cfg.num_heads
        self.nope_dim, self.rope_dim, self.v_dim, self.rank = (m.qk_nope_head_dim, m.qk_rope_head_dim,
                                                               m.v_head_dim, m.kv_lora_rank)
        hq = m.qk_head_dim
        kw = dict(dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)
        std, bias = cfg.init_std, cfg.attention_bias
        self.q = self.q_a = self.q_norm = self.q_b = nnx.data(None)
        if m.q_lora_rank:
            rq = m.q_lora_rank
            self.q_a = Einsum("BTD,DR->BTR", (d, rq), ("embed", None), std=std,
                              bias_shape=(rq,) if bias else None, bias_axes=(None,), **kw)
            self.q_norm = Norm(rq, "rmsnorm", LATENT_NORM_EPS, cfg.params_dtype)
            # the latent (input) dim of q_b / kv_b is sharded like a hidden dim ("embed": over fsdp),
            # else FSDP would keep a whole copy of them on every device (208 MiB of DeepSeek-V2-Lite's kv_b)
            self.q_b = Einsum("BTR,RNH->BTNH", (rq, n, hq), ("embed", "heads", "head_dim"), std=std, **kw)
        else:
            self.q = Einsum("BTD,DNH->BTNH", (d, n, hq), ("embed", "heads", "head_dim"), std=std, **kw)
        c = self.rank + self.rope_dim
        self.kv_a = Einsum("BTD,DC->BTC", (d, c), ("embed", None), std=std, bias_shape=(c,) if bias else None,
                           bias_axes=(None,), **kw)
        self.kv_norm = Norm(self.rank, "rmsnorm", LATENT_NORM_EPS, cfg.params_dtype)
        self.kv_b = Einsum("BTR,RNH->BTNH", (self.rank, n, self.nope_dim + self.v_dim), ("embed", "heads", "head_dim"),
                           std=std, **kw)
        self.o = Einsum("BTNH,NHD->BTD", (n, self.v_dim, d), ("heads", "head_dim", "embed"),
                        std=std / math.sqrt(2 * cfg.num_layers),
                        bias_shape=(d,) if cfg.attention_out_bias else None, bias_axes=(None,), **kw)
        self.rope_config = cfg  # static: RoPE frequencies at trace time (cfg.head_dim == Hr)
        self.softcap = cfg.attn_logit_softcap or None
        self.scale = softmax_scale(cfg)
        self.impl = cfg.attention_impl
        self.cache_form = "auto"  # with a cache: "auto" (by cost, `absorbed_is_cheaper`) | "absorbed" | "naive"

    def __call__(self, x_BTD, *, positions_BT, segment_ids_BT, window, kv_cache=None, cache_index=None,
                 kv_positions_BS=None, kv_segment_ids_BS=None, dropout_rng=None):
        """(out_BTD, new kv_cache or None), as `Attention.__call__`; `kv_cache` is `(c_kv, k_pe,
        layer)`: the stacked [L, B, S, R] / [L, B, S, Hr] buffers and this layer's index, or one
        layer's [B, S, R] / [B, S, Hr] buffers and `layer=None`."""
        r_q, r_qb, r_kva, r_kvb, r_o = projection_keys(dropout_rng, 5)
        if self.q is not None:
            q_BTNH = self.q(x_BTD, rng=r_q)
        else:
            q_BTNH = self.q_b(self.q_norm(self.q_a(x_BTD, rng=r_q)), rng=r_qb)
        q_BTNH = constrain(q_BTNH, ("batch", "length", "heads", "head_dim"))
        ckv_BTC = self.kv_a(x_BTD, rng=r_kva)
        c_BTR = constrain(self.kv_norm(ckv_BTC[..., :self.rank]), ("batch", "length", None))
        k_pe_BT1H = ckv_BTC[..., None, self.rank:]
        q_nope_BTNH, q_pe_BTNH = q_BTNH[..., :self.nope_dim], q_BTNH[..., self.nope_dim:]
        # keys are cached after RoPE, with this call's frequencies (as Attention's)
        inv_freq = rope_inverse_frequencies(self.rope_config, positions_BT)
        factor = rope_attention_factor(self.rope_config)
        q_pe_BTNH = rope(q_pe_BTNH, positions_BT, inv_freq=inv_freq, attention_factor=factor)
        k_pe_BTH = rope(k_pe_BT1H, positions_BT, inv_freq=inv_freq, attention_factor=factor)[:, :, 0]
        mask_kw = dict(window=window, softcap=self.softcap, scale=self.scale)
        if kv_cache is None:
            out_BTNV = self.expanded(q_nope_BTNH, q_pe_BTNH, c_BTR, k_pe_BTH, segment_ids=segment_ids_BT,
                                     positions=positions_BT, rng=r_kvb, **mask_kw)
            new_cache = None
        else:
            c_buf, pe_buf, layer = kv_cache
            at = (0, cache_index, 0)
            new_c, new_pe = c_BTR, k_pe_BTH
            if layer is not None:
                new_c, new_pe, at = new_c[None], new_pe[None], (layer, *at)
            c_buf = jax.lax.dynamic_update_slice(c_buf, new_c.astype(c_buf.dtype), at)
            pe_buf = jax.lax.dynamic_update_slice(pe_buf, new_pe.astype(pe_buf.dtype), at)
            c_BSR, k_pe_BSH = (c_buf, pe_buf) if layer is None else (c_buf[layer], pe_buf[layer])
            dt = q_BTNH.dtype
            kv_kw = dict(segment_ids=(segment_ids_BT, kv_segment_ids_BS), positions=(positions_BT, kv_positions_BS),
                         **mask_kw)
            if self.absorbs(q_BTNH.shape[1]):
                w_RNH = self.kv_b.kernel.dense(dt)
                out_BTNV = absorbed_attention(q_nope_BTNH, q_pe_BTNH, c_BSR.astype(dt), k_pe_BSH.astype(dt),
                                              w_RNH[..., :self.nope_dim], w_RNH[..., self.nope_dim:], **kv_kw)
            else:
                out_BTNV = self.expanded(q_nope_BTNH, q_pe_BTNH, c_BSR.astype(dt), k_pe_BSH.astype(dt), **kv_kw)
            new_cache = (c_buf, pe_buf)
        out_BTNV = checkpoint_name(constrain(out_BTNV, ("batch", "length", "heads", "head_dim")), "attention")
        return self.o(out_BTNV, rng=r_o), new_cache

    def absorbs(self, t: int) -> bool:
        """Whether T new queries attend over the cache in the absorbed form (`cache_form`)."""
        if self.cache_form not in CACHE_FORMS:
            raise ValueError(f"MlaAttention.cache_form={self.cache_form!r} is not valid; expected one of "
                             f"{CACHE_FORMS}")
        if self.cache_form != "auto":
            return self.cache_form == "absorbed"
        return absorbed_is_cheaper(t, self.rope_config)

    def expanded(self, q_nope_BTNH, q_pe_BTNH, c_BSR, k_pe_BSH, *, segment_ids, positions, window, softcap, scale,
                 rng=None):
        """The naive form: per-head keys [k_nope; k_pe] and values from the latents (kv_b), then
        `dot_product_attention` (values with their own head dim). Out [B, T, N, Hv]."""
        kv_BSNH = constrain(self.kv_b(c_BSR, rng=rng), ("batch", "length", "heads", "head_dim"))
        k_nope_BSNH, v_BSNV = kv_BSNH[..., :self.nope_dim], kv_BSNH[..., self.nope_dim:]
        b, s, n, _ = k_nope_BSNH.shape
        k_BSNH = jnp.concatenate([k_nope_BSNH, jnp.broadcast_to(k_pe_BSH[:, :, None].astype(k_nope_BSNH.dtype),
                                                                 (b, s, n, self.rope_dim))], axis=-1)
        q_BTNH = jnp.concatenate([q_nope_BTNH, q_pe_BTNH], axis=-1)
        return dot_product_attention(q_BTNH, k_BSNH, v_BSNV, segment_ids=segment_ids, positions=positions,
                                     causal=True, window=window, softcap=softcap, scale=scale, impl=self.impl)
