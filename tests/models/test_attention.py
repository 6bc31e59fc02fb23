"""dot_product_attention against a float64 NumPy reference written from the definition."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import cached_attention, dot_product_attention
from pallas_kernels.reference import masked_attention


def reference(q, k, v, *, q_seg=None, k_seg=None, q_pos=None, k_pos=None, causal=True, window=None,
              softcap=None, scale=None):
    """Loops over batch and heads in float64; returns (out [B,T,N,V], lse [B,N,T])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    scale = 1 / np.sqrt(h) if scale is None else scale
    if q_pos is None:
        q_pos = np.broadcast_to(np.arange(t) + s - t, (b, t))
        k_pos = np.broadcast_to(np.arange(s), (b, s))
    out = np.zeros((b, t, n, v.shape[-1]))
    lse = np.zeros((b, n, t))
    for bi, ni in itertools.product(range(b), range(n)):
        ki = ni // (n // kh)
        scores = q[bi, :, ni] @ k[bi, :, ki].T * scale
        if softcap:
            scores = softcap * np.tanh(scores / softcap)
        allowed = np.ones((t, s), bool)
        if q_seg is not None:
            allowed &= q_seg[bi][:, None] == k_seg[bi][None, :]
        d = q_pos[bi][:, None] - k_pos[bi][None, :]
        if causal:
            allowed &= d >= 0
        if window:
            allowed &= (d < window) if causal else (np.abs(d) < window)
        for ti in range(t):
            if not allowed[ti].any():
                continue  # fully masked rows are checked separately
            sc = scores[ti][allowed[ti]]
            m = sc.max()
            p = np.exp(sc - m)
            lse[bi, ni, ti] = m + np.log(p.sum())
            out[bi, ti, ni] = (p / p.sum()) @ v[bi, allowed[ti], ki]
    return out, lse


def _inputs(seed, b=2, t=24, s=24, n=4, kh=2, h=16, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    q = r.standard_normal((b, t, n, h)).astype(np.float32)
    k = r.standard_normal((b, s, kh, h)).astype(np.float32)
    v = r.standard_normal((b, s, kh, h)).astype(np.float32)
    return q, k, v


@pytest.mark.parametrize("causal,window,softcap,n,kh", [
    (True, None, None, 4, 4),  # MHA
    (True, None, None, 4, 2),  # GQA
    (True, None, None, 4, 1),  # MQA
    (False, None, None, 4, 2),
    (True, 5, None, 4, 2),
    (False, 3, None, 4, 2),
    (True, None, 7.0, 4, 2),
    (True, 4, 5.0, 6, 3),
])
def test_matches_reference(causal, window, softcap, n, kh):
    q, k, v = _inputs(hash((causal, window, softcap, n, kh)) % 1000, n=n, kh=kh)
    out, lse = dot_product_attention(q, k, v, causal=causal, window=window, softcap=softcap, return_lse=True)
    ref_out, ref_lse = reference(q, k, v, causal=causal, window=window, softcap=softcap)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=1e-5)


def test_segments_and_positions_packed_rows():
    q, k, v = _inputs(1, t=20, s=20)
    seg = np.array([[1] * 7 + [2] * 9 + [0] * 4, [1] * 20], np.int32)
    pos = np.array([list(range(7)) + list(range(9)) + [0] * 4, list(range(20))], np.int32)
    out = dot_product_attention(q, k, v, segment_ids=seg, positions=pos, causal=True)
    ref, _ = reference(q, k, v, q_seg=seg, k_seg=seg, q_pos=pos, k_pos=pos, causal=True)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=2e-5, rtol=1e-5)
    assert np.isfinite(np.asarray(out)).all()


def test_separate_q_and_kv_ids_decode_shape():
    """T != S: a chunk of 3 queries against 16 cached keys, some cache slots empty (segment 0)."""
    q, k, v = _inputs(2, t=3, s=16)
    k_seg = np.array([[1] * 12 + [0] * 4, [0] * 2 + [1] * 10 + [0] * 4], np.int32)
    k_pos = np.array([list(range(12)) + [0] * 4, [0, 0] + list(range(10)) + [0] * 4], np.int32)
    q_seg = np.ones((2, 3), np.int32)
    q_pos = np.array([[9, 10, 11], [7, 8, 9]], np.int32)
    out = dot_product_attention(q, k, v, segment_ids=(q_seg, k_seg), positions=(q_pos, k_pos), window=6)
    ref, _ = reference(q, k, v, q_seg=q_seg, k_seg=k_seg, q_pos=q_pos, k_pos=k_pos, window=6)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("t,n,kh,window,softcap", [
    (1, 4, 2, None, None),  # one decode step
    (1, 8, 1, 5, 9.0),
    (4, 6, 3, None, 4.0),  # a speculative verification chunk
    (9, 4, 1, 6, None),
])
def test_cached_attention_heads_first_matches_reference(t, n, kh, window, softcap):
    """Queries against a heads-first [B, K, S, H] cache with empty and padded slots."""
    s = 16
    q, k, v = _inputs(10 + t + n, t=t, s=s, n=n, kh=kh)
    k_seg = np.array([[1] * 13 + [0] * 3, [0] * 3 + [1] * 13], np.int32)
    k_pos = np.array([list(range(13)) + [0] * 3, [0] * 3 + list(range(13))], np.int32)
    q_seg = np.ones((2, t), np.int32)
    q_pos = np.array([list(range(13 - t, 13)), list(range(13 - t, 13))], np.int32)
    out = cached_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids=(q_seg, k_seg),
                           positions=(q_pos, k_pos), window=window, softcap=softcap)
    ref, _ = reference(q, k, v, q_seg=q_seg, k_seg=k_seg, q_pos=q_pos, k_pos=k_pos, window=window, softcap=softcap)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"k, v \[B,K,S,H\]"):
        cached_attention(q, k, v, segment_ids=(q_seg, k_seg), positions=(q_pos, k_pos))


def test_fully_masked_rows_are_finite():
    q, k, v = _inputs(3, t=4, s=4)
    q_seg = np.array([[1, 1, 2, 2]] * 2, np.int32)
    k_seg = np.array([[1, 1, 1, 1]] * 2, np.int32)  # segment 2 queries have no keys
    out, lse = dot_product_attention(q, k, v, segment_ids=(q_seg, k_seg), causal=False, return_lse=True)
    assert np.isfinite(np.asarray(out)).all()
    assert (np.asarray(lse)[:, :, 2:] < -1e30).all()


def test_scale_and_bfloat16():
    q, k, v = _inputs(4)
    out = dot_product_attention(jnp.asarray(q, jnp.bfloat16), jnp.asarray(k, jnp.bfloat16),
                                jnp.asarray(v, jnp.bfloat16), scale=0.3)
    assert out.dtype == jnp.bfloat16
    ref, _ = reference(q, k, v, scale=0.3)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=5e-2, rtol=2e-2)


def test_gradients_match_float64_jax():
    q, k, v = _inputs(5, t=10, s=10)
    f32 = lambda q, k, v: (dot_product_attention(q, k, v, window=4) ** 2).sum()  # noqa: E731
    g = jax.grad(f32, argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64():
        g64 = jax.grad(f32, argnums=(0, 1, 2))(*(np.asarray(x, np.float64) for x in (q, k, v)))
    for a, b in zip(g, g64):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,match", [
    (dict(impl="flash"), "impl='flash' is not valid"),
    (dict(segment_ids=(np.ones((2, 24)), np.ones((2, 24)), np.ones((2, 24)))), "pair"),
])
def test_errors(kwargs, match):
    q, k, v = _inputs(6)
    with pytest.raises(ValueError, match=match):
        dot_product_attention(q, k, v, **kwargs)


def test_head_mismatch_error():
    q, k, v = _inputs(7, n=4, kh=3)
    with pytest.raises(ValueError, match="not a multiple"):
        dot_product_attention(q, k, v)


def test_cudnn_rejects_what_it_cannot_do():
    q, k, v = _inputs(8)
    with pytest.raises(ValueError, match="segment_ids"):
        dot_product_attention(q, k, v, segment_ids=np.ones((2, 24), np.int32), impl="cudnn")


@pytest.mark.parametrize("causal,window,softcap,n,kh,packed", [
    (True, None, None, 4, 2, True),
    (True, 9, None, 4, 1, True),
    (False, None, 3.0, 4, 4, False),
    (True, 40, 2.0, 6, 2, True),
])
def test_blockwise_path_matches_reference(causal, window, softcap, n, kh, packed):
    """T = 256 takes the blockwise (causal block skipping, recomputing backward) path."""
    from models import attention as A

    b, t, h = 2, 256, 16
    assert A._block_size(t) is not None
    q, k, v = _inputs(10 + n, b=b, t=t, s=t, n=n, kh=kh, h=h)
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    if packed:
        seg[0, 100:], pos[0, 100:] = 2, np.arange(t - 100)
        seg[1, 230:] = 0
    kw = dict(segment_ids=seg, positions=pos, causal=causal, window=window, softcap=softcap)
    out, lse = dot_product_attention(q, k, v, return_lse=True, **kw)
    ref_out, ref_lse = reference(q, k, v, q_seg=seg, k_seg=seg, q_pos=pos, k_pos=pos, causal=causal, window=window,
                                 softcap=softcap)
    real = seg > 0
    np.testing.assert_allclose(np.asarray(out)[real], ref_out[real], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(np.moveaxis(np.asarray(lse), 1, 2)[real], np.moveaxis(ref_lse, 1, 2)[real],
                               atol=2e-5, rtol=1e-5)

    w = np.random.default_rng(0).standard_normal((b, n, t)).astype(np.float32)

    def objective(fn):  # uses the output and the lse, as ring attention will
        def f(q, k, v):
            o, l = fn(q, k, v)
            return (o ** 2).sum() + (l * w * real[:, None, :]).sum()
        return f

    grads = jax.grad(objective(lambda q, k, v: dot_product_attention(q, k, v, return_lse=True, **kw)),
                     argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64():
        plain = lambda q, k, v: masked_attention(  # noqa: E731  (the unblocked definition, float64)
            q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=causal,
            window=window, softcap=softcap, scale=1 / np.sqrt(h), return_lse=True)
        ref = jax.grad(objective(plain), argnums=(0, 1, 2))(*(np.asarray(x, np.float64) for x in (q, k, v)))
    for g, r in zip(grads, ref):
        np.testing.assert_allclose(g, r, atol=1e-4 * np.abs(r).max(), rtol=1e-4)


def test_blockwise_path_in_bfloat16():
    q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in _inputs(20, t=256, s=256))
    out = dot_product_attention(q, k, v)
    ref, _ = reference(*(np.asarray(x, np.float32) for x in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2, rtol=2e-2)


def test_fully_masked_rows_are_zero_with_no_gradient():
    """A query with no key to see (its segment has none) gives 0, lse MASK_VALUE, no gradient."""
    from pallas_kernels.reference import MASK_VALUE

    q, k, v = _inputs(30, t=8, s=8)
    q_seg = np.ones((2, 8), np.int32)
    q_seg[:, -3:] = 0
    k_seg = np.where(q_seg > 0, 1, 5).astype(np.int32)  # no key in segment 0
    out, lse = dot_product_attention(q, k, v, segment_ids=(q_seg, k_seg), return_lse=True)
    assert (np.asarray(out)[:, -3:] == 0).all() and (np.asarray(lse)[:, :, -3:] == MASK_VALUE).all()
    g = jax.grad(lambda v: (dot_product_attention(q, k, v, segment_ids=(q_seg, k_seg))[:, -3:] ** 2).sum())(v)
    assert float(np.abs(np.asarray(g)).max()) == 0.0


@pytest.mark.parametrize("t,hv,window,softcap", [
    (24, 6, None, None),  # plain path, values narrower than q/k (DeepSeek: 128 vs 192)
    (24, 24, 5, 4.0),  # plain path, values wider
    (256, 10, 40, None),  # blockwise path (recomputing backward)
])
def test_values_with_their_own_head_dim(t, hv, window, softcap):
    """v [B,S,K,V] with V != H (multi-head latent attention): outputs, lse and gradients equal the
    float64 definitions."""
    b, n, kh, h = 2, 4, 2, 16
    q, k, _ = _inputs(40 + hv, b=b, t=t, s=t, n=n, kh=kh, h=h)
    v = np.random.default_rng(hv).standard_normal((b, t, kh, hv)).astype(np.float32)
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    seg[0, t // 3:], pos[0, t // 3:] = 2, np.arange(t - t // 3)
    kw = dict(segment_ids=seg, positions=pos, window=window, softcap=softcap)
    out, lse = dot_product_attention(q, k, v, return_lse=True, **kw)
    assert out.shape == (b, t, n, hv)
    ref_out, ref_lse = reference(q, k, v, q_seg=seg, k_seg=seg, q_pos=pos, k_pos=pos, window=window, softcap=softcap)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=1e-5)

    def loss(fn):
        def f(q, k, v):
            o, l = fn(q, k, v)
            return (o ** 2).sum() + (l * 0.1).sum()
        return f

    grads = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, return_lse=True, **kw)),
                     argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64():
        plain = lambda q, k, v: masked_attention(  # noqa: E731
            q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, window=window, softcap=softcap,
            scale=1 / np.sqrt(h), return_lse=True)
        ref = jax.grad(loss(plain), argnums=(0, 1, 2))(*(np.asarray(x, np.float64) for x in (q, k, v)))
    for g, r in zip(grads, ref):
        assert g.shape == r.shape
        np.testing.assert_allclose(g, r, atol=1e-4 * np.abs(r).max(), rtol=1e-4)


def test_value_head_dim_errors():
    q, k, _ = _inputs(50)
    v = np.zeros((2, 24, 2, 6), np.float32)
    with pytest.raises(ValueError, match="impl='cudnn' does not support values with their own head dim"):
        dot_product_attention(q, k, v, impl="cudnn")
    with pytest.raises(ValueError, match=r"v \[B,S,K,V\]"):
        dot_product_attention(q, k, np.zeros((2, 23, 2, 6), np.float32))
