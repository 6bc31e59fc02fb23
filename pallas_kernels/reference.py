"""Pure-JAX attention reference: the definition every attention implementation is tested against.

Lives at the bottom of the import graph (`pallas_kernels` imports nothing from the project), so
the kernels, their tests and `models.attention` share one definition of the masks:
  * query i may see key j iff seg_q[i] == seg_k[j]                      (packing, padding)
  * and, when causal, pos_k[j] <= pos_q[i]
  * and, with a window W > 0, pos_q[i] - pos_k[j] < W (W most recent keys, itself included;
    Hugging Face's `sliding_window`); without causality the window is symmetric, |dpos| < W.
Scores are q.k * scale, soft-capped (softcap * tanh(s / softcap)) when asked, then, with ALiBi
slopes m [N] (Press et al., 2021, arXiv 2108.12409), biased by -m[n] * |pos_q[i] - pos_k[j]|:
a linear penalty on the distance by positions, so packed documents (positions restarting) and
cached keys (explicit positions) get the same bias as a lone sequence. Causally, |dpos| is the
paper's i - j; without causality the bias is symmetric, like the window. The slopes are fixed
(no gradient flows to them).
A query whose keys are all masked (padding) gets output 0, lse MASK_VALUE (about -3.4e38) and
no gradient, never NaN; every implementation (blockwise XLA, ring, Pallas kernels) agrees. Scores, softmax and accumulation are float32 (float64 when the
inputs are float64 and x64 is on).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def check_qkv(q_BTNH, k_BSKH, v_BSKV, who: str = "attention"):
    """Validates the [B,T,N,H] / [B,S,K,H] / [B,S,K,V] layout (values may have a head dim V of
    their own, as multi-head latent attention's); returns (b, t, n, h, s, kv_heads)."""
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKV.ndim != 4 or v_BSKV.shape[:3] != k_BSKH.shape[:3]:
        raise ValueError(f"{who} expects q [B,T,N,H], k [B,S,K,H] and v [B,S,K,V] (v's head dim V may differ); "
                         f"got q {q_BTNH.shape}, k {k_BSKH.shape}, v {v_BSKV.shape}")
    b, t, n, h = q_BTNH.shape
    _, s, kh, hk = k_BSKH.shape
    if k_BSKH.shape[0] != b or hk != h:
        raise ValueError(f"q {q_BTNH.shape} and k {k_BSKH.shape} disagree on batch or head_dim")
    if n % kh:
        raise ValueError(f"q has {n} heads, not a multiple of k's {kh} kv heads")
    return b, t, n, h, s, kh


def split_pair(x, name):
    """One [B, T] array shared by q and kv, or a (q_BT, kv_BS) pair -> (q, kv)."""
    if x is None:
        return None, None
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"{name} must be one [B,T] array or a (q_BT, kv_BS) pair; got {len(x)} items")
        return x[0], x[1]
    return x, x


def attention_mask(q_pos_BT, k_pos_BS, q_seg_BT=None, k_seg_BS=None, *, causal=True, window=None):
    """Boolean [B, T, S] mask (True = may attend). `window` may be a traced int (0 = global)."""
    mask = jnp.ones((), bool)
    if q_seg_BT is not None:
        mask = q_seg_BT[:, :, None] == k_seg_BS[:, None, :]
    dpos = q_pos_BT[:, :, None] - k_pos_BS[:, None, :]
    if causal:
        mask = mask & (dpos >= 0)
    if window is not None:
        window = jnp.asarray(window)
        in_window = (dpos < window) if causal else (jnp.abs(dpos) < window)
        mask = mask & ((window <= 0) | in_window)
    return jnp.broadcast_to(mask, (q_pos_BT.shape[0], q_pos_BT.shape[1], k_pos_BS.shape[1]))


def alibi_bias(q_pos_BT, k_pos_BS, slopes_N):
    """ALiBi's bias -slope * |q_pos - k_pos| as float32 [B, N, T, S] (float64 with float64 slopes
    under x64)."""
    slopes = jax.lax.stop_gradient(jnp.asarray(slopes_N))
    slopes = slopes.astype(jnp.promote_types(slopes.dtype, jnp.float32))
    dist = jnp.abs(q_pos_BT[:, :, None] - k_pos_BS[:, None, :]).astype(slopes.dtype)
    return -slopes[None, :, None, None] * dist[:, None]


def check_alibi_slopes(alibi_slopes, num_heads: int, who: str = "attention"):
    """None, or the slopes as an [N] float array; a ValueError names a wrong shape."""
    if alibi_slopes is None:
        return None
    slopes = jnp.asarray(alibi_slopes)
    if slopes.shape != (num_heads,) or not jnp.issubdtype(slopes.dtype, jnp.floating):
        raise ValueError(f"{who}: alibi_slopes must be a float [N={num_heads}] array (one slope per query head) "
                         f"or None; got {slopes.dtype}{list(slopes.shape)}")
    return slopes


def default_positions(batch: int, q_len: int, kv_len: int):
    """Queries are the last `q_len` of `kv_len` keys (equal lengths: the same tokens)."""
    q = jnp.arange(q_len, dtype=jnp.int32) + (kv_len - q_len)
    k = jnp.arange(kv_len, dtype=jnp.int32)
    return jnp.broadcast_to(q, (batch, q_len)), jnp.broadcast_to(k, (batch, kv_len))


def masked_softmax(s, mask, softcap=None, bias=None):
    """(probabilities, lse) of scaled scores [..., S] under a boolean mask broadcastable to them:
    softcap first, then `bias` (ALiBi's, broadcastable) added, masked keys get probability 0, a
    fully masked row p = 0 and lse MASK_VALUE."""
    if softcap:
        s = softcap * jnp.tanh(s / softcap)
    if bias is not None:
        s = s + bias
    s = jnp.where(mask, s, MASK_VALUE)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)
    return p, jnp.where(mask.any(-1), lse, MASK_VALUE)


def masked_attention(q, k, v, *, q_pos, k_pos, q_seg, k_seg, causal, window, softcap, scale, return_lse,
                     alibi_slopes=None):
    """The definition, on explicit q/kv positions and segment ids. out [B,T,N,V] (V: v's head
    dim), lse [B,N,T]."""
    b, t, n, h = q.shape
    kh = k.shape[2]
    g = n // kh
    acc = jnp.promote_types(q.dtype, jnp.float32)
    q_BTKGH = q.reshape(b, t, kh, g, h)
    s = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k, preferred_element_type=acc) * scale
    mask = attention_mask(q_pos, k_pos, q_seg, k_seg, causal=causal, window=window)[:, None, None]
    bias = None
    if alibi_slopes is not None:
        bias = alibi_bias(q_pos, k_pos, jnp.asarray(alibi_slopes).astype(acc)).reshape(b, kh, g, t, k.shape[1])
    p, lse_BKGT = masked_softmax(s, mask, softcap, bias)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", p.astype(v.dtype), v, preferred_element_type=acc)
    out_BTNH = out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)
    if return_lse:
        return out_BTNH, lse_BKGT.reshape(b, n, t)
    return out_BTNH


def attention_reference(q_BTNH, k_BSKH, v_BSKH, *, segment_ids=None, positions=None, causal=True, window=None,
                        softcap=None, scale=None, return_lse=False, alibi_slopes=None):
    """`dot_product_attention`'s keywords and meanings, computed by the plain definition."""
    b, t, n, h = q_BTNH.shape
    alibi_slopes = check_alibi_slopes(alibi_slopes, n, "attention_reference")
    q_seg, k_seg = split_pair(segment_ids, "segment_ids")
    q_pos, k_pos = split_pair(positions, "positions")
    if q_pos is None:
        q_pos, k_pos = default_positions(b, t, k_BSKH.shape[1])
    return masked_attention(q_BTNH, k_BSKH, v_BSKH, q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg,
                            causal=causal, window=None if isinstance(window, int) and window <= 0 else window,
                            softcap=softcap,
                            scale=(1.0 / h ** 0.5) if scale is None else scale, return_lse=return_lse,
                            alibi_slopes=alibi_slopes)
