"""The one attention function every model calls.

`dot_product_attention(q_BTNH, k_BSKH, v_BSKV, ...)` with `impl` chosen by config (values may
have a head dim V of their own, as multi-head latent attention's):
  "xla"    plain JAX: blockwise causal attention with a recomputing backward for training rows
           (T == S), the masked-softmax definition (`pallas_kernels.reference`) otherwise;
  "cudnn"  `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs;
  "pallas" our own flash-attention kernels (`pallas_kernels.flash_attention`).
Decoding against the model's heads-first KV cache goes through `cached_attention`, the same
definition on the cache's [B, K, S, H] layout.

Masking is expressed with positions and segment ids (defined in `pallas_kernels.reference`), so
the same code serves training on packed rows, left-padded batches and decoding against a KV
cache. ALiBi (`alibi_slopes`, Press et al. 2021) is a bias on the scores from the same positions,
-slope[n] * |pos_q - pos_k|, added after the soft-cap, in every implementation but "cudnn"
(which raises); the slopes are constants (no gradient reaches them). A query whose keys are all
masked gets a finite output and an lse of about -3.4e38 instead of NaN, so padded rows never
poison a loss or a ring-attention merge.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models.ring_attention import ring_attention, sequence_shards
from pallas_kernels import flash_attention
from pallas_kernels.reference import (MASK_VALUE, alibi_bias, attention_mask, check_alibi_slopes, check_qkv,
                                      default_positions, masked_attention, masked_softmax, split_pair)

IMPLS = ("xla", "cudnn", "pallas")


# --------------------------------------------------------------------------------------------
# Blockwise attention for training rows (flash-attention structure, in plain XLA).
#
# When queries and keys are the same sequence (T == S, one set of positions and segment ids),
# causality by position within a segment implies causality by index, so query block i only
# needs keys [0, (i+1) * block): the masked upper triangle of blocks is never computed. The
# custom VJP saves q, k, v, the output and the log-sum-exp, and recomputes the probabilities
# block by block in the backward pass, so no [T, S] array outlives its block. This is the
# CPU/XLA fast path; it is tested against the same reference as every other implementation.


def _scores(q_BTKGH, k_BSKH, q_pos, k_pos, q_seg, k_seg, slopes_KG, *, causal, window, softcap, scale):
    """Masked scores [B,K,G,T,S] (f32) and, with softcap, tanh(raw / softcap) for the backward.
    ALiBi's bias (slopes [K, G] or None) comes after the cap: it changes no derivative."""
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * scale
    th = None
    if softcap:
        th = jnp.tanh(s / softcap)
        s = softcap * th
    if slopes_KG is not None:
        dist = jnp.abs(q_pos[:, :, None] - k_pos[:, None, :]).astype(jnp.float32)  # [B, T, S]
        s = s - slopes_KG[None, :, :, None, None] * dist[:, None, None]
    mask = attention_mask(q_pos, k_pos, q_seg, k_seg, causal=causal, window=window)[:, None, None]
    return jnp.where(mask, s, MASK_VALUE), mask, th


def _sl(x, lo, hi):
    return None if x is None else x[:, lo:hi]


def _blockwise_fwd(q, k, v, pos, seg, window, slopes, causal, softcap, scale, block):
    b, t, n, h = q.shape
    kh, hv = k.shape[2], v.shape[-1]
    qr = q.reshape(b, t, kh, n // kh, h)
    outs, lses = [], []
    for i in range(t // block):
        lo, hi = i * block, (i + 1) * block
        end = hi if causal else t
        s, mask, _ = _scores(qr[:, lo:hi], k[:, :end], pos[:, lo:hi], pos[:, :end], _sl(seg, lo, hi),
                             _sl(seg, 0, end), slopes, causal=causal, window=window, softcap=softcap, scale=scale)
        live = mask.any(-1, keepdims=True)  # rows with at least one key (padding rows have none)
        m = s.max(-1, keepdims=True)
        p = jnp.exp(s - m)  # masked scores are MASK_VALUE: 0 here, except in rows with no key at all
        l_sum = p.sum(-1, keepdims=True)
        o = jnp.einsum("BKGTS,BSKV->BTKGV", p.astype(v.dtype), v[:, :end], preferred_element_type=jnp.float32)
        outs.append(jnp.where(jnp.moveaxis(live, 3, 1), o / jnp.moveaxis(l_sum, 3, 1), 0.0))
        lses.append(jnp.where(live, m + jnp.log(l_sum), MASK_VALUE)[..., 0])
    out = jnp.concatenate(outs, axis=1).reshape(b, t, n, hv).astype(q.dtype)
    lse = jnp.concatenate(lses, axis=-1)  # [B, K, G, T]
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _blockwise(q, k, v, pos, seg, window, slopes, causal, softcap, scale, block):
    """`slopes`: ALiBi's [K, G] float32 (query head k * G + g), or None."""
    return _blockwise_fwd(q, k, v, pos, seg, window, slopes, causal, softcap, scale, block)


def _blockwise_vjp_fwd(q, k, v, pos, seg, window, slopes, causal, softcap, scale, block):
    out, lse = _blockwise_fwd(q, k, v, pos, seg, window, slopes, causal, softcap, scale, block)
    return (out, lse), (q, k, v, pos, seg, window, slopes, out, lse)


def _blockwise_vjp_bwd(causal, softcap, scale, block, res, cts):
    q, k, v, pos, seg, window, slopes, out, lse = res
    d_out, d_lse = cts
    b, t, n, h = q.shape
    kh, hv = k.shape[2], v.shape[-1]
    g = n // kh
    qr = q.reshape(b, t, kh, g, h)
    do = d_out.reshape(b, t, kh, g, hv)
    # delta = rowsum(dO * O) - dlse: the softmax backward's per-row correction
    delta = jnp.einsum("BTKGV,BTKGV->BKGT", do.astype(jnp.float32), out.reshape(b, t, kh, g, hv).astype(jnp.float32))
    if d_lse is not None:
        delta = delta - d_lse.astype(jnp.float32)
    dq_blocks = []
    dk = jnp.zeros(k.shape, jnp.float32)
    dv = jnp.zeros(v.shape, jnp.float32)
    for i in range(t // block):
        lo, hi = i * block, (i + 1) * block
        end = hi if causal else t
        kb, vb, qb, dob = k[:, :end], v[:, :end], qr[:, lo:hi], do[:, lo:hi]
        s, mask, th = _scores(qb, kb, pos[:, lo:hi], pos[:, :end], _sl(seg, lo, hi), _sl(seg, 0, end), slopes,
                              causal=causal, window=window, softcap=softcap, scale=scale)
        p = jnp.exp(s - lse[..., lo:hi, None]) * mask.any(-1, keepdims=True)  # rows with no key: no gradient
        dv = dv.at[:, :end].add(jnp.einsum("BKGTS,BTKGV->BSKV", p.astype(v.dtype), dob,
                                           preferred_element_type=jnp.float32))
        dp = jnp.einsum("BTKGV,BSKV->BKGTS", dob, vb, preferred_element_type=jnp.float32)
        ds = jnp.where(mask, p * (dp - delta[..., lo:hi, None]), 0.0)
        if softcap:
            ds = ds * (1.0 - th * th)
        ds = (ds * scale).astype(q.dtype)
        dq_blocks.append(jnp.einsum("BKGTS,BSKH->BTKGH", ds, kb, preferred_element_type=jnp.float32))
        dk = dk.at[:, :end].add(jnp.einsum("BKGTS,BTKGH->BSKH", ds, qb, preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dq_blocks, axis=1).reshape(b, t, n, h).astype(q.dtype)
    zero_int = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    # the slopes are constants (`dot_product_attention` stops their gradient)
    d_slopes = None if slopes is None else jnp.zeros_like(slopes)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), zero_int(pos), zero_int(seg), zero_int(window), d_slopes


_blockwise.defvjp(_blockwise_vjp_fwd, _blockwise_vjp_bwd)


def _block_size(t: int) -> int | None:
    """Query block for the blockwise path, or None when the plain path is as good."""
    for block in (64, 128):
        if t % block == 0 and t // block >= 4 and (block == 128 or t <= 1024):
            return block
    return None


def _cudnn_attention(q, k, v, *, q_pos, k_pos, q_seg, k_seg, causal, window, softcap, scale, return_lse,
                     alibi_slopes, explicit_positions, explicit_segments):
    unsupported = []
    if v.shape[-1] != k.shape[-1]:
        unsupported.append(f"values with their own head dim (v {v.shape[-1]}, q/k {k.shape[-1]})")
    if alibi_slopes is not None:
        unsupported.append("alibi_slopes")
    if explicit_segments:
        unsupported.append("segment_ids")
    if explicit_positions:
        unsupported.append("positions")
    if softcap:
        unsupported.append(f"softcap={softcap}")
    if return_lse:
        unsupported.append("return_lse=True")
    if window is not None and not isinstance(window, int):
        unsupported.append("a traced per-layer window")
    if unsupported:
        raise ValueError(f"impl='cudnn' does not support {', '.join(unsupported)}; use impl='xla' or 'pallas'")
    local = None
    if window:
        # jax.nn counts the query itself outside the window: W most recent keys = (W - 1, 0).
        local = (window - 1, 0 if causal else window - 1)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, local_window_size=local,
                                        implementation="cudnn")


def dot_product_attention(q_BTNH, k_BSKH, v_BSKV, *, segment_ids=None, positions=None, causal=True,
                          window=None, softcap=None, scale=None, return_lse=False, impl="xla", alibi_slopes=None):
    """Multi-head attention with grouped-query K/V, masks from positions and segment ids.

    Args:
      q_BTNH: queries [batch, q_len, heads, head_dim].
      k_BSKH, v_BSKV: keys [batch, kv_len, kv_heads, head_dim] and values [batch, kv_len, kv_heads,
        v_head_dim]; heads % kv_heads == 0 (query head n uses kv head n // (heads // kv_heads), as
        Hugging Face's `repeat_kv`). v_head_dim may differ from head_dim (multi-head latent
        attention, models/mla.py): "xla" and "pallas" take it, "cudnn" raises.
      segment_ids: int [B, T] shared by q and kv, or a (q_BT, kv_BS) pair; 0 marks padding.
      positions: int [B, T] or a (q_BT, kv_BS) pair; default: queries are the last T of S keys.
      causal: mask keys at later positions.
      window: W > 0 restricts each query to the W most recent keys (itself included); None or 0 = global.
      softcap: scores -> softcap * tanh(scores / softcap) before masking.
      scale: score scale, default 1/sqrt(head_dim).
      return_lse: also return the log-sum-exp of the scaled scores, [B, N, T] float32.
      impl: "xla" | "cudnn" | "pallas".
      alibi_slopes: ALiBi slopes [N] (float; `models.positions.alibi_slopes`) or None: scores get
        -slope[n] * |pos_q - pos_k| after the soft-cap. Constants: no gradient flows to them.
    Returns:
      out_BTNV (V = v_head_dim) in q's dtype, and lse_BNT if `return_lse`.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl={impl!r} is not valid; expected one of {IMPLS}")
    b, t, n, h, s, kh = check_qkv(q_BTNH, k_BSKH, v_BSKV)
    scale = (1.0 / h ** 0.5) if scale is None else scale
    alibi_slopes = check_alibi_slopes(alibi_slopes, n, "dot_product_attention")
    if alibi_slopes is not None:
        alibi_slopes = jax.lax.stop_gradient(alibi_slopes.astype(jnp.float32))
    q_seg, k_seg = split_pair(segment_ids, "segment_ids")
    q_pos, k_pos = split_pair(positions, "positions")
    if q_pos is None:
        q_pos, k_pos = default_positions(b, t, s)
    if window is not None and isinstance(window, int) and window <= 0:
        window = None
    kw = dict(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, causal=causal, window=window,
              softcap=softcap, scale=scale, return_lse=return_lse, alibi_slopes=alibi_slopes)
    shared = not isinstance(segment_ids, (tuple, list)) and not isinstance(positions, (tuple, list))
    if impl != "cudnn" and t == s and shared and sequence_shards() > 1:
        # context parallelism: the sequence is sharded over the mesh's `sequence` axis
        return ring_attention(q_BTNH, k_BSKH, v_BSKV, positions=q_pos, segment_ids=q_seg, causal=causal,
                              window=window, softcap=softcap, scale=scale, return_lse=return_lse,
                              alibi_slopes=alibi_slopes)
    if impl == "xla":
        block = _block_size(t) if (t == s and shared) else None
        if block is not None:
            window_arr = None if window is None else jnp.asarray(window, jnp.int32)
            slopes = None if alibi_slopes is None else alibi_slopes.reshape(kh, n // kh)
            out, lse = _blockwise(q_BTNH, k_BSKH, v_BSKV, q_pos, q_seg, window_arr, slopes, causal, softcap or None,
                                  float(scale), block)
            return (out, lse.reshape(b, n, t)) if return_lse else out
        return masked_attention(q_BTNH, k_BSKH, v_BSKV, **kw)
    if impl == "cudnn":
        return _cudnn_attention(q_BTNH, k_BSKH, v_BSKV, **kw, explicit_positions=positions is not None,
                                explicit_segments=segment_ids is not None)
    return flash_attention(q_BTNH, k_BSKH, v_BSKV, segment_ids=segment_ids, positions=positions,
                           causal=causal, window=window, softcap=softcap, scale=scale, return_lse=return_lse,
                           alibi_slopes=alibi_slopes)


# --------------------------------------------------------------------------------------------
# Decoding: T new queries against the heads-first KV cache.


def cached_attention(q_BTNH, k_BKSH, v_BKSH, *, segment_ids, positions, window=None, softcap=None, scale=None,
                     impl="xla", return_lse=False, alibi_slopes=None):
    """`dot_product_attention` (causal, explicit (q, kv) positions and segment ids) of T new
    queries over a heads-first cache [B, K, S, H]: scores and values as batched matmuls over
    (B, K) with no transpose of the cache.

    Scores, softmax and accumulation are float32; on CPU the operands are converted to float32
    first (XLA's CPU runtime has no bf16 x bf16 -> f32 kernel for these batch-major dots). Other
    impls (prefill of long prompts with flash attention) get the cache transposed to
    [B, S, K, H] and go through `dot_product_attention`. `return_lse` also returns the
    log-sum-exp of the scaled scores, [B, N, T] float32. `alibi_slopes` [N]: ALiBi's bias from the
    query and cache positions, as in `dot_product_attention`.
    """
    if impl != "xla":
        k, v = k_BKSH.transpose(0, 2, 1, 3), v_BKSH.transpose(0, 2, 1, 3)
        return dot_product_attention(q_BTNH, k, v, segment_ids=segment_ids, positions=positions, causal=True,
                                     window=window, softcap=softcap, scale=scale, impl=impl, return_lse=return_lse,
                                     alibi_slopes=alibi_slopes)
    b, t, n, h = q_BTNH.shape
    kh = k_BKSH.shape[1]
    if k_BKSH.ndim != 4 or k_BKSH.shape != v_BKSH.shape or k_BKSH.shape[0] != b or k_BKSH.shape[3] != h or n % kh:
        raise ValueError(f"cached_attention expects q [B,T,N,H] and k, v [B,K,S,H] (N a multiple of K); got "
                         f"q {q_BTNH.shape}, k {k_BKSH.shape}, v {v_BKSH.shape}")
    g = n // kh
    scale = (1.0 / h ** 0.5) if scale is None else scale
    q_seg, k_seg = split_pair(segment_ids, "segment_ids")
    q_pos, k_pos = split_pair(positions, "positions")
    if isinstance(window, int) and window <= 0:
        window = None
    acc = jnp.promote_types(q_BTNH.dtype, jnp.float32)
    q_BKGTH = q_BTNH.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4)
    k, v = k_BKSH, v_BKSH
    if jax.default_backend() == "cpu":
        q_BKGTH, k, v = q_BKGTH.astype(acc), k.astype(acc), v.astype(acc)
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k, preferred_element_type=acc)
    mask = attention_mask(q_pos, k_pos, q_seg, k_seg, causal=True, window=window)[:, None, None]
    bias = None
    alibi_slopes = check_alibi_slopes(alibi_slopes, n, "cached_attention")
    if alibi_slopes is not None:
        bias = alibi_bias(q_pos, k_pos, alibi_slopes.astype(acc)).reshape(b, kh, g, t, k.shape[2])
    p, lse_BKGT = masked_softmax(s * scale, mask, softcap, bias)
    # (B, K)-major output: XLA's CPU dot for a (B, T)-major one is several times slower
    out = jnp.einsum("BKGTS,BKSH->BKGTH", p.astype(v.dtype), v, preferred_element_type=acc)
    out_BTNH = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_BTNH.dtype)
    if return_lse:
        return out_BTNH, lse_BKGT.astype(jnp.float32).reshape(b, n, t)
    return out_BTNH
